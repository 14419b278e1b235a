"""Corpus: a DataLoader with two (non-persistent) workers and its own generator, a random split,
an overridden florql.arg and a config file read at start.

Run with `--florql-args lr=0.05`. `config.json` (beside the script) is changed after recording;
replay must use the version the run read. The dataset draws a random augmentation in the workers.
Lines starting with `# +` are the extra logs of the ground-truth variant.
"""

import json

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, random_split

import florql


class NoisyBlobs(Dataset):
    def __init__(self, n, dim, noise):
        g = torch.Generator().manual_seed(11)
        self.centres = torch.randn(4, dim, generator=g)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.points = self.centres[self.labels] + torch.randn(n, dim, generator=g)
        self.noise = noise

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        # Augmentation in the worker: seeded per worker from the loader's base seed.
        return self.points[i] + self.noise * torch.randn(self.points.shape[1]), self.labels[i]


lr = florql.arg("lr", 0.1)
epochs = florql.arg("epochs", 5)
# Read after the first florql call: florql sees (and versions) files opened from then on. Reading it
# before any florql call is the known gap tested by test_config_read_before_any_florql_call.
with open("config.json") as f:
    config = json.load(f)
torch.manual_seed(config["seed"])
dataset = NoisyBlobs(config["samples"], config["dim"], config["noise"])
train_set, val_set = random_split(dataset, [0.75, 0.25])  # draws from the global RNG
train_loader = DataLoader(
    train_set,
    batch_size=config["batch_size"],
    shuffle=True,
    num_workers=2,
    generator=torch.Generator().manual_seed(config["seed"] + 1),
)
val_loader = DataLoader(val_set, batch_size=64, num_workers=0)
model = nn.Sequential(nn.Linear(config["dim"], config["hidden"]), nn.ReLU(), nn.Linear(config["hidden"], 4))
optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

with florql.checkpointing(model=model, optimizer=optimizer, budget=0.9):
    for epoch in florql.loop("epoch", range(epochs)):
        model.train()
        for xb, yb in florql.loop("step", train_loader):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            optimizer.step()
            florql.log("loss", loss.item())
            # +florql.log("batch_sum", xb.sum())
            # +florql.log("first_label", yb[0])
        model.eval()
        correct = 0
        with torch.no_grad():
            for xb, yb in val_loader:
                correct += (model(xb).argmax(1) == yb).sum().item()
        florql.log("val_acc", correct / len(val_set))
        # +florql.log("param_sum", sum(p.sum() for p in model.parameters()))
        # +florql.log("lr_used", optimizer.param_groups[0]["lr"])
