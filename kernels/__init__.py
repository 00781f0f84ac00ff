"""attnserve GPU/CPU kernels: attention backends behind one interface, and the paged KV write."""
