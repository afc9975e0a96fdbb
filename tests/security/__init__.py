"""Security tests: what a queued request, a workload or another team can and cannot see (docs/security.md)."""
