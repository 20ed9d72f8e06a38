"""Scenarios that run real hosts and VMs as processes: the demo, benchmarks, tests."""
