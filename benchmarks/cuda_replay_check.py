"""Bit-exact hindsight replay of a CUDA run: dropout on the GPU, CUDA RNG restored from checkpoints.

Records a run that logs little, records the same code logging everything (ground truth), then asks
for the missing values and compares bit for bit. Needs a CUDA device; prints the card.

    python benchmarks/cuda_replay_check.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import torch

SCRIPT = """
import torch, florql
torch.manual_seed(0)
dev = "cuda"
X = torch.randn(4096, 64, device=dev); Y = (X[:, :8].sum(1) > 0).long()
net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(256, 2)).to(dev)
opt = torch.optim.Adam(net.parameters(), lr=1e-3)
with florql.checkpointing(model=net, optimizer=opt):
    for epoch in florql.loop("epoch", range(8)):
        net.train()
        perm = torch.randperm(4096, device=dev)
        for step in florql.loop("step", range(16)):
            idx = perm[step * 256:(step + 1) * 256]
            loss = torch.nn.functional.cross_entropy(net(X[idx]), Y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
            florql.log("loss", loss)
            #HINDSIGHT_STEP
        net.eval()
        with torch.no_grad():
            acc = (net(X).argmax(1) == Y).float().mean()
        florql.log("acc", acc)
        #HINDSIGHT_EPOCH
"""
STEP = 'florql.log("grad_norm", torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))'
EPOCH = 'florql.log("w_norm", net[0].weight.detach().norm())'


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    import florql

    card = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, FLORQL_HOME=os.path.join(tmp, ".florql"))
        path = os.path.join(tmp, "train.py")
        with open(path, "w") as f:
            f.write(SCRIPT)
        subprocess.run([sys.executable, "train.py"], cwd=tmp, env=env, check=True)
        full = SCRIPT.replace("#HINDSIGHT_STEP", STEP).replace("#HINDSIGHT_EPOCH", EPOCH)
        with open(path, "w") as f:
            f.write(full)
        subprocess.run([sys.executable, "train.py"], cwd=tmp, env=env, check=True)
        db = florql.connect(env["FLORQL_HOME"])
        ok = True
        for sql in (
            "SELECT epoch, step, grad_norm FROM run_{} WHERE epoch >= 5 ORDER BY ALL",
            "SELECT epoch, w_norm FROM run_{} ORDER BY ALL",
        ):
            started = time.perf_counter()
            hindsight = db.sql(sql.format(1)).arrow()
            took = time.perf_counter() - started
            truth = db.sql(sql.format(2)).arrow()
            same = hindsight.equals(truth) and hindsight.num_rows > 0
            ok &= same
            print(f"{card}: {sql.format(1)!r}: {hindsight.num_rows} rows, bit-exact={same}, {took:.1f} s")
        jobs = db.sql("SELECT executed, restored FROM replay_jobs ORDER BY log_from").fetchall()
        print(f"jobs (executed, restored): {jobs}")
    print("CUDA replay check:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
