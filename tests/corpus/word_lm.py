"""Corpus: a word-level language model with a manual SGD update and plateau annealing.

No optimizer object: `p.data.add_(p.grad, alpha=-lr)`; `lr` is a Python float divided by 4 when the
validation loss does not improve; `best_val_loss` and `global_step` are plain module globals. The
hidden state is carried across steps (truncated BPTT). Lines starting with `# +` are the extra logs
of the ground-truth variant.
"""

import math  # noqa: F401  (used by the ground-truth variant's `# +` lines)

import torch
from torch import nn

import florql

torch.manual_seed(1111)
lr = florql.arg("lr", 20.0)
clip = florql.arg("clip", 0.25)
epochs = florql.arg("epochs", 6)
bptt = 8
batch_size = 4
ntokens = 50

# A tiny synthetic corpus: a noisy Markov chain over a 50-word vocabulary.
corpus_gen = torch.Generator().manual_seed(5)
transitions = torch.randint(0, ntokens, (ntokens, 3), generator=corpus_gen)
words = [0]
for i in range(1, 1600):
    choice = torch.randint(0, 3, (1,), generator=corpus_gen).item()
    words.append(transitions[words[-1], choice].item())
ids = torch.tensor(words)


def batchify(data, bsz):
    nbatch = data.size(0) // bsz
    return data[: nbatch * bsz].view(bsz, -1).t().contiguous()


train_data = batchify(ids[:1280], batch_size)
val_data = batchify(ids[1280:], batch_size)


class RNNModel(nn.Module):
    def __init__(self, ntoken, ninp, nhid):
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.GRU(ninp, nhid)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nhid = nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        return self.decoder(output).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz):
        return torch.zeros(1, bsz, self.nhid)


def get_batch(source, i):
    seq_len = min(bptt, len(source) - 1 - i)
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len].reshape(-1)


def evaluate(data_source):
    model.eval()
    total_loss = 0.0
    hidden = model.init_hidden(batch_size)
    with torch.no_grad():
        for i in range(0, data_source.size(0) - 1, bptt):
            data, targets = get_batch(data_source, i)
            output, hidden = model(data, hidden)
            total_loss += len(data) * criterion(output, targets).item()
    return total_loss / (len(data_source) - 1)


model = RNNModel(ntokens, 16, 24)
criterion = nn.CrossEntropyLoss()
best_val_loss = None
global_step = 0

with florql.checkpointing(model=model, budget=0.9):
    for epoch in florql.loop("epoch", range(1, epochs + 1)):
        model.train()
        hidden = model.init_hidden(batch_size)
        for batch, i in florql.loop("step", enumerate(range(0, train_data.size(0) - 1, bptt))):
            data, targets = get_batch(train_data, i)
            hidden = hidden.detach()
            model.zero_grad()
            output, hidden = model(data, hidden)
            loss = criterion(output, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            # +florql.log("grad_norm", sum(p.grad.norm() ** 2 for p in model.parameters()).sqrt())
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-lr)
            global_step += 1
            florql.log("loss", loss.item())
        val_loss = evaluate(val_data)
        florql.log("val_loss", val_loss)
        # +florql.log("lr", lr)
        # +florql.log("global_step", global_step)
        # +florql.log("val_ppl", math.exp(val_loss))
        # +florql.log("hidden_norm", hidden.norm())
        if not best_val_loss or val_loss < best_val_loss:
            best_val_loss = val_loss
        else:
            lr /= 4.0
        # +florql.log("best_val_loss", best_val_loss)
