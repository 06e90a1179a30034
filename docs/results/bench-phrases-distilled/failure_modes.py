"""One-step failure modes on the phrases bench: word salad vs collapse.

Run from the repository root after the bench: python docs/results/bench-phrases-distilled/failure_modes.py OUT.json
(it loads the checkpoints that results.json names, i.e. the bench cache runs/bench-cache).
"""
import json, sys, collections
import torch
import fmlm
torch.set_num_threads(1)
r = json.load(open("docs/results/bench-phrases-distilled/results.json"))
out = {}
for label in ("FMLM", "Duo", "Duo+DCD", "MDLM", "MDLM+SDTT"):
    m = fmlm.load(r["variants"][label]["checkpoint"], device="cpu")
    task = m.task
    tab = {tuple(x) for x in task._table.tolist()}
    for steps in (1, 8):
        ids = m.sample_ids(1024, steps, seed=0)
        rows = [tuple(x) for x in ids.tolist()]
        invalid = [x for x in rows if x not in tab]
        # positional word salad: every position holds a word that some phrase has at that position
        pos = [{p[l] for p in tab} for l in range(3)]
        salad = [x for x in invalid if all(x[l] in pos[l] for l in range(3))]
        repeat = sum(len(set(x)) == 1 for x in rows)
        cnt = collections.Counter(rows)
        out[f"{label} {steps}"] = dict(invalid=len(invalid) / 1024, positional_salad_share_of_invalid=len(salad) / max(len(invalid), 1),
                                      all_same_token=repeat / 1024, distinct=len(cnt), top_share=cnt.most_common(1)[0][1] / 1024)
        print(label, steps, out[f"{label} {steps}"], flush=True)
json.dump(out, open(sys.argv[1], "w"), indent=2)
