"""Corpus: a train()/test() function pair called from the epoch loop of main() (MNIST-example style).

The step loop lives in train(), the evaluation in test(); both log from inside helper functions
(and test() logs through a helper it calls). Synthetic 'digits': 8x8 images of 10 noisy prototypes.
Lines starting with `# +` are the extra logs of the ground-truth variant.
"""

import argparse

import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim.lr_scheduler import StepLR
from torch.utils.data import DataLoader, TensorDataset

import florql


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(4 * 3 * 3, 32)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)


def synthetic_digits(n, generator):
    prototypes = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = prototypes[labels] + 0.8 * torch.randn(n, 1, 8, 8, generator=generator)
    return TensorDataset(images, labels)


def report_accuracy(correct, total):
    accuracy = correct / total
    # +florql.log("test_accuracy", accuracy)
    return accuracy


def train(args, model, loader, optimizer, epoch):
    model.train()
    for data, target in florql.loop("step", loader):
        optimizer.zero_grad()
        output = model(data)
        loss = F.nll_loss(output, target)
        loss.backward()
        # +florql.log("grad_norm", torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
        optimizer.step()
        florql.log("loss", loss.item())


def test(model, loader):
    model.eval()
    test_loss = 0.0
    correct = 0
    with torch.no_grad():
        for data, target in loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    test_loss /= len(loader.dataset)
    florql.log("test_loss", test_loss)
    return report_accuracy(correct, len(loader.dataset))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    epochs = florql.arg("epochs", 5)
    lr = florql.arg("lr", 1.0)
    torch.manual_seed(1)
    data_gen = torch.Generator().manual_seed(7)
    train_loader = DataLoader(synthetic_digits(128, data_gen), batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(synthetic_digits(64, data_gen), batch_size=64)
    model = Net()
    optimizer = optim.Adadelta(model.parameters(), lr=lr)
    scheduler = StepLR(optimizer, step_size=1, gamma=0.7)
    with florql.checkpointing(model=model, optimizer=optimizer, scheduler=scheduler, budget=0.9):
        for epoch in florql.loop("epoch", range(1, epochs + 1)):
            train(args, model, train_loader, optimizer, epoch)
            test(model, test_loader)
            # +florql.log("lr", scheduler.get_last_lr()[0])
            scheduler.step()


if __name__ == "__main__":
    main()
