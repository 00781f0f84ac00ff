"""attnserve clients: the Python SDK and the load-testing tools. They talk to the server over HTTP only."""
