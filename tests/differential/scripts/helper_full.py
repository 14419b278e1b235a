"""Differential test script in the pytorch/examples layout, full version: a `train(epoch)` helper
holds the batch loop, called from the outer epoch loop; logs only `loss` (per step) and `val_acc`.

helper_min.py plus the hindsight statements marked `# hindsight`; they only read state.
"""

import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import florql

lr = florql.arg("lr", 0.1)
epochs = florql.arg("epochs", 6)
seed = florql.arg("seed", 0)

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)
torch.set_num_threads(1)

data = np.random.default_rng(seed)
x_all = torch.tensor(data.normal(size=(180, 8)), dtype=torch.float32)
y_all = torch.tensor(data.integers(0, 3, 180), dtype=torch.int64)
loader = DataLoader(TensorDataset(x_all[:144], y_all[:144]), batch_size=24, shuffle=True)  # 6 steps
x_val, y_val = x_all[144:], y_all[144:]

net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
criterion = nn.CrossEntropyLoss()


def train(epoch):
    net.train()
    florql.log("h_w_start", float(net[0].weight.detach().norm()))  # hindsight: epoch level, inside the helper
    total, batches = 0.0, 0
    for x, y in florql.loop("step", loader):
        opt.zero_grad()
        loss = criterion(net(x), y)
        loss.backward()
        florql.log(
            "h_grad_norm", float(torch.norm(torch.stack([p.grad.norm() for p in net.parameters()])))
        )  # hindsight
        opt.step()
        florql.log("loss", loss.item())
        total += loss.item()
        batches += 1
    return total / batches  # from locals the loop left behind: a skipping replay must restore them


def test():
    net.eval()
    with torch.no_grad():
        return (net(x_val).argmax(dim=1) == y_val).float().mean().item()


with florql.checkpointing(budget=0.9, model=net, optimizer=opt, scheduler=sched):
    for epoch in florql.loop("epoch", range(epochs)):
        train_loss = train(epoch)
        val_acc = test()
        florql.log("val_acc", val_acc)
        florql.log("h_w_norm", float(net[0].weight.detach().norm()))  # hindsight: epoch level, outer loop body
        florql.log("h_train_loss", train_loss)  # hindsight: epoch level, what the helper returned
        sched.step()
        time.sleep(0.03)  # lets each epoch's checkpoint persist before the next one
