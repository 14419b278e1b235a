"""florql demo: an MLP with dropout on a seeded synthetic 10-class problem.

Run it (records a run in ./.florql, or $FLORQL_HOME):

    python examples/train.py
    python examples/train.py --florql-args lr=0.05 epochs=4

Only `loss` (per step) and `val_acc` (per epoch) are logged; anything else — gradient norms,
per-class accuracy, weight statistics — can be asked for in hindsight with a FlorQL query.
"""

import random

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import florql

lr = florql.arg("lr", 0.1)
epochs = florql.arg("epochs", 8)
batch_size = florql.arg("batch_size", 64)
seed = florql.arg("seed", 0)
n_samples = florql.arg("samples", 4000)

random.seed(seed)
np.random.seed(seed)
torch.manual_seed(seed)

# A 10-class problem: each class is a Gaussian blob around its own centre in 32 dimensions,
# pushed through a fixed random nonlinearity so a linear model is not enough.
N_FEATURES, N_CLASSES = 32, 10
data_rng = np.random.default_rng(seed)
centres = data_rng.normal(0.0, 1.0, (N_CLASSES, N_FEATURES))
labels = data_rng.integers(0, N_CLASSES, n_samples)
points = centres[labels] + data_rng.normal(0.0, 1.6, (n_samples, N_FEATURES))
mixing = data_rng.normal(0.0, 1.0 / np.sqrt(N_FEATURES), (N_FEATURES, N_FEATURES))
features = np.tanh(points @ mixing) + 0.1 * points

x_all = torch.tensor(features, dtype=torch.float32)
y_all = torch.tensor(labels, dtype=torch.int64)
order = torch.randperm(n_samples)
n_val = n_samples // 5
val_idx, train_idx = order[:n_val], order[n_val:]
train_set = TensorDataset(x_all[train_idx], y_all[train_idx])
x_val, y_val = x_all[val_idx], y_all[val_idx]

loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=0)

net = nn.Sequential(
    nn.Linear(N_FEATURES, 128),
    nn.ReLU(),
    nn.Dropout(0.2),
    nn.Linear(128, 64),
    nn.ReLU(),
    nn.Dropout(0.2),
    nn.Linear(64, N_CLASSES),
)
opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
criterion = nn.CrossEntropyLoss()

with florql.checkpointing(model=net, optimizer=opt, scheduler=sched):
    for epoch in florql.loop("epoch", range(epochs)):
        net.train()
        for x, y in florql.loop("step", loader):
            opt.zero_grad()
            logits = net(x)
            loss = criterion(logits, y)
            loss.backward()
            opt.step()
            florql.log("loss", loss.item())
        sched.step()

        # Evaluated here, in the epoch body, so a replay can restore the end-of-epoch
        # checkpoint instead of re-running the steps when only epoch-level values are asked for.
        net.eval()
        with torch.no_grad():
            val_logits = net(x_val)
            val_acc = (val_logits.argmax(dim=1) == y_val).float().mean().item()
        florql.log("val_acc", val_acc)
        print(f"epoch {epoch}: loss {loss.item():.4f} val_acc {val_acc:.3f}")
