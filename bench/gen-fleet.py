#!/usr/bin/env python3
"""Generates a benchmark fleet: N classic hosts with F files each, a share of them
(default 90 %) coming from a common/ directory linked into every host. Fixed seed."""
import argparse, os, random

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--hosts", type=int, default=1000)
p.add_argument("--files", type=int, default=300)
p.add_argument("--shared", type=float, default=0.9)
p.add_argument("--size", type=int, default=1024, help="bytes per file")
p.add_argument("--seed", type=int, default=7)
a = p.parse_args()
rng = random.Random(a.seed)

def text(n):
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz \n") for _ in range(n))

shared = int(a.files * a.shared)
own = a.files - shared
os.makedirs(os.path.join(a.dir, "common"), exist_ok=True)
with open(os.path.join(a.dir, "bento.toml"), "w") as f:
    f.write("[server]\naccount_prefix = \"b-\"\n")
blob = text(a.size * 4)
for i in range(shared):
    d = os.path.join(a.dir, "common", f"m{i // 50}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"mod{i}.nix"), "w") as f:
        f.write(f"# common module {i}\n" + blob[i % 97:][: a.size])
for h in range(a.hosts):
    hd = os.path.join(a.dir, "hosts", f"h{h:05d}")
    os.makedirs(hd, exist_ok=True)
    os.symlink("../../common", os.path.join(hd, "common"))
    with open(os.path.join(hd, "configuration.nix"), "w") as f:
        f.write("{ ... }: { imports = [ ./common ]; }\n")
    for i in range(own - 1):
        with open(os.path.join(hd, f"own{i}.nix"), "w") as f:
            f.write(f"# host {h} file {i}\n" + blob[(h + i) % 89:][: a.size])
