"""Corpus: pytorch/examples' mnist and vae as laid out there, small.

The script lives in `mnist/` and keeps its data in `../data` (downloaded there when missing, as
torchvision's MNIST(root="../data", download=True) does); like vae it writes a reconstruction per
epoch into `results/`, a folder that exists in the checkout (kept by a .gitignore), and it
writes metrics to `../out/`. Lines starting with `# +` are the extra logs of the ground-truth
variant.
"""

import os

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

import florql

DATA = "../data/MNIST/digits.pt"


def load_digits():
    if not os.path.exists(DATA):  # the "download"
        os.makedirs(os.path.dirname(DATA), exist_ok=True)
        g = torch.Generator().manual_seed(11)
        torch.save(
            {"images": torch.randn(96, 1, 8, 8, generator=g), "labels": torch.randint(0, 10, (96,), generator=g)}, DATA
        )
    digits = torch.load(DATA)
    return TensorDataset(digits["images"], digits["labels"])


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 24)
        self.fc2 = nn.Linear(24, 10)
        self.decode = nn.Linear(10, 64)

    def forward(self, x):
        hidden = F.relu(self.fc1(torch.flatten(x, 1)))
        return F.log_softmax(self.fc2(hidden), dim=1)


def train(model, loader, optimizer):
    model.train()
    for data, target in florql.loop("step", loader):
        optimizer.zero_grad()
        loss = F.nll_loss(model(data), target)
        loss.backward()
        # +florql.log("grad_norm", torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm())
        optimizer.step()
        florql.log("loss", loss.item())


def main():
    torch.manual_seed(1)
    loader = DataLoader(load_digits(), batch_size=16, shuffle=True)
    model = Net()
    optimizer = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    os.makedirs("../out", exist_ok=True)
    with florql.checkpointing(model=model, optimizer=optimizer):
        for epoch in florql.loop("epoch", range(florql.arg("epochs", 5))):
            train(model, loader, optimizer)
            with torch.no_grad():
                sample = model.decode(torch.eye(10))
                torch.save(sample, f"results/reconstruction_{epoch}.pt")
                # +florql.log("sample_mean", sample.mean())
            with open(f"../out/metrics_{epoch}.txt", "w") as f:
                f.write(f"{sample.abs().sum().item()}\n")


if __name__ == "__main__":
    main()
