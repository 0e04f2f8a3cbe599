"""The web page for physicists and the HTTP API for scripts and monitoring."""
