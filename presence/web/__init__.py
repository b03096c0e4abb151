"""The web pages (Klein + Jinja2) on the --web listener."""
