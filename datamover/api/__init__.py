"""The site daemon's REST API (aiohttp): routes, auth, the one error-to-HTTP mapping, and
the OpenAPI document it serves (`openapi.json`, kept in the repository and tested against
the server)."""
