"""Object stores for sealed bundles and results: local folder (default) and S3."""
