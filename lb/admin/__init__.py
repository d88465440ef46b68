"""The admin process: JSON API, Prometheus metrics and the live dashboard.

Run by the supervisor as `python -m lb.admin --runtime DIR --fd N`; see
`lb.admin.app`.
"""
