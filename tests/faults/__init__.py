"""The fault suite: broker, worker, network and lifecycle faults on a project-owned node."""
