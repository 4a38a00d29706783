"""The ops kit: a Grafana dashboard (``grafana``) and Prometheus alert rules (``alerts``)."""
