#!/usr/bin/env python3
"""Generates a chroot for the `bento status` benchmark (see docs/benchmarks.md): HOSTS host
directories, each with a live manifest of FILES config entries, a heartbeat, a latest report,
and a year of older reports under logs/reports/ (hard links to one file per host, so the
directory entries are real but the disk stays small). States are mixed with a fixed seed:
mostly up to date, some pending, failing, rolled back, silent and never seen.

    gen-status-chroot.py DIR [--hosts 10000] [--reports 365] [--files 200] [--now RFC3339]
"""

import argparse
import hashlib
import json
import os
import random
from datetime import datetime, timedelta, timezone


def rfc3339(t):
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def sha(b):
    return hashlib.sha256(b).hexdigest()


def store_path(rng, name):
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    return "/nix/store/" + "".join(rng.choice(alphabet) for _ in range(32)) + "-" + name


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--hosts", type=int, default=10000)
    ap.add_argument("--reports", type=int, default=365)
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--now", default="2026-11-25T12:00:00Z")
    a = ap.parse_args()
    rng = random.Random(7)
    now = datetime.strptime(a.now, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    os.makedirs(os.path.join(a.dir, ".bento"), exist_ok=True)

    config = [{"path": "common", "kind": "directory"}]
    for i in range(a.files):
        config.append({"path": f"common/m{i:04}.nix", "kind": "file", "size": 1024,
                       "sha256": sha(f"module {i}".encode()), "executable": False})
    config.sort(key=lambda e: e["path"].encode())

    for n in range(a.hosts):
        host = f"host{n:05}"
        hd = os.path.join(a.dir, host)
        for sub in ("manifests", "objects", "logs/reports"):
            os.makedirs(os.path.join(hd, sub), exist_ok=True)
        sys_old = store_path(rng, f"nixos-system-{host}-1")
        sys_new = store_path(rng, f"nixos-system-{host}-2")
        created = now - timedelta(hours=2)
        manifest = {"format": 1, "host": host, "created": rfc3339(created), "source_commit": None,
                    "build": "flake", "system": sys_new,
                    "config": config + [{"path": "flake.nix", "kind": "file", "size": 300,
                                         "sha256": sha(host.encode()), "executable": False}],
                    "files": []}
        manifest["config"].sort(key=lambda e: e["path"].encode())
        mbytes = (json.dumps(manifest, separators=(",", ":")) + "\n").encode()
        digest = sha(mbytes)
        write(os.path.join(hd, "manifests", digest + ".json"), mbytes)
        write(os.path.join(hd, "current"), (digest + "\n").encode())

        roll = rng.random()
        if roll < 0.01:
            continue  # never seen: no logs at all
        older = sha(f"{host} older".encode())
        if roll < 0.90:
            version, outcome, after, seen = digest, "success", sys_new, now - timedelta(minutes=5)
        elif roll < 0.95:
            version, outcome, after, seen = older, "success", sys_old, now - timedelta(minutes=5)
        elif roll < 0.97:
            version, outcome, after, seen = digest, "failure", sys_old, now - timedelta(minutes=5)
        elif roll < 0.98:
            version, outcome, after, seen = digest, "rollback", sys_old, now - timedelta(minutes=5)
        else:
            version, outcome, after, seen = digest, "success", sys_new, now - timedelta(hours=3)
        report = {
            "format": 1, "id": seen.strftime("%Y%m%dT%H%M%SZ") + "-0000abcd", "host": host,
            "version": version, "previous_version": older, "outcome": outcome,
            "system_before": sys_old, "system_after": after, "built_system": after,
            "started": rfc3339(seen - timedelta(minutes=1)), "finished": rfc3339(seen),
            "timings": {"total_ms": 60000}, "agent_version": "0.1.0",
            "error": None if outcome == "success" else "build failed: example error",
            "log_tail": "\n".join(f"building line {i}" for i in range(30)),
            "reboot_required": False,
        }
        rbytes = (json.dumps(report, indent=2) + "\n").encode()
        write(os.path.join(hd, "logs", "latest.json"), rbytes)
        hb = {"format": 1, "host": host, "time": rfc3339(seen),
              "version": version if outcome == "success" else older,
              "system": after, "last_outcome": outcome, "last_report": report["id"],
              "agent_version": "0.1.0"}
        write(os.path.join(hd, "logs", "heartbeat.json"),
              (json.dumps(hb, separators=(",", ":")) + "\n").encode())
        # A year of older reports: one real file, the rest hard links to it.
        reports = os.path.join(hd, "logs", "reports")
        first = None
        for d in range(a.reports):
            rid = (now - timedelta(days=d + 1)).strftime("%Y%m%dT%H%M%SZ") + "-0000abcd"
            p = os.path.join(reports, rid + ".json")
            if first is None:
                write(p, rbytes)
                first = p
            else:
                os.link(first, p)


if __name__ == "__main__":
    main()
