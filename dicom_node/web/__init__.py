"""The web page for physicists (issue 16): jobs, doses, reports and actions, served by `mcnode serve`.

Starlette (routes, sessions) with Jinja2 templates, run by uvicorn on a thread of the node process;
users in `data_dir/web_users.json` with Argon2id hashes (argon2-cffi); `/metrics` by prometheus_client.
Nothing here is imported unless `[web] port` is set, so the node without a web page does not load it.
"""
