"""Where the partition test would be skipped: only where `ip netns` cannot run or is
refused, and then the reason says which (no cluster is started here)."""

from __future__ import annotations

import subprocess

from cluster import netns


def test_a_missing_ip_command_is_a_reason_naming_it(monkeypatch):
    def missing(*_args, **_kwargs):
        raise FileNotFoundError(2, "No such file or directory", "ip")

    monkeypatch.setattr(subprocess, "run", missing)
    assert (
        netns.netns_refused() == "`ip netns` cannot run: [Errno 2] No such file or directory: 'ip'"
    )


def test_a_refused_ip_netns_add_is_a_reason_quoting_it(monkeypatch):
    def refused(argv, **_kwargs):
        return subprocess.CompletedProcess(
            argv, 1, "", "mount --make-shared /run/netns failed: Operation not permitted\n"
        )

    monkeypatch.setattr(subprocess, "run", refused)
    reason = netns.netns_refused()
    assert reason is not None
    assert reason.startswith("`ip netns add` was refused: mount --make-shared")
    assert "Operation not permitted" in reason
