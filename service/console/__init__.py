"""The browser console: static files in `static/` (no build step) and the JSON it reads."""
