"""attnserve HTTP server (OpenAI-compatible API). Arrives with the server issue; the engine is usable offline meanwhile."""
