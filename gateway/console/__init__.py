"""The admin web console at /console: server-rendered pages (Jinja2), inline SVG charts and a little
vanilla JS, every asset shipped inside this package (no CDN, no build step).

Invariant: every page and its JSON read through `access.require_*`, so a team session only ever sees its own
team's figures and keys; every write checks the session's CSRF token and leaves an audit row.
"""

from gateway.console.routes import install_console

__all__ = ["install_console"]
