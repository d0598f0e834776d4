"""Independent BoolQ check: score the first N items with plain transformers (lm-eval's recipe:
context and continuation tokenised separately, sum of continuation log-probs) and compare with
alsparse's score_items. Usage: python benchmarks/check_boolq_scoring.py N"""

import json
import sys

import torch

from alsparse.data.paths import data_file
from alsparse.data.tasks import load_task
from alsparse.eval.zeroshot import score_items
from alsparse.sources import load_model

N = int(sys.argv[1])
model, tok = load_model("smollm2-135m", dtype="float32", device="cpu")  # the converted real model
model.eval()
rows = [json.loads(line) for line in open(data_file("tasks/boolq.jsonl"))][:N]
mine = []
with torch.no_grad():
    for r in rows:
        ctx = r["query"][len("Passage: "):] + "\nAnswer:"
        lls = []
        for choice in r["choices"]:
            c = tok(ctx, add_special_tokens=False).input_ids; t = tok(" " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([c + t]); logp = model(ids).logits.log_softmax(-1)[0]
            lls.append(sum(float(logp[len(c) - 1 + i, t[i]]) for i in range(len(t))))
        mine.append(lls)
items = load_task("boolq", N)
ours = score_items(model, tok, items)
diff = max(abs(a - b) for x, y in zip(mine, ours) for a, b in zip(x, y))
pred_yes = sum(l[1] > l[0] for l in mine)
acc = sum((l[1] > l[0]) == (r["gold"] == 1) for l, r in zip(mine, rows)) / N
print(f"N={N} max |loglik diff| {diff:.2e}; predicts yes on {pred_yes}/{N}; gold yes {sum(r['gold'] for r in rows)}/{N}; acc {acc:.2f}")
