# Session 8 diagnostic (NOTES.md §14): python benchmarks/explore/session8-input-probes.py MODEL_DIR RUNTIME_SEED...
import sys, torch, copy, json
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
from nft.io import load_model
from nft.runs import attack_from_run, clean_set, dataset_of
from nft.purify import purify, recipe
from nft.runtime import Runtime
from nft.evaluate import evaluate, poisoned_test_set
from nft.searches import universal_probe, NeuronPerturbation
from nft.masks import attach
from halves import halves
torch.set_num_threads(1)
run = sys.argv[1]
model, man = load_model(run); data = dataset_of(man); attack = attack_from_run(run, man)
clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=50, seed=0)
target = halves(data.test, data.num_classes)[0]; pois = poisoned_test_set(target, attack)
def probes(m, tag):
    out = {"tag": tag}
    for eps in (0.15, 0.3):
        out[f"u{eps}"] = universal_probe(m, clean.x, clean.y, eps, 0.25, 50, 64, torch.Generator().manual_seed(707))
    # targeted: per class c, delta pushing all images to c (min CE to c); flip rate to c
    from nft.searches import UniversalPerturbation
    rates = []
    for c in range(10):
        up = UniversalPerturbation(tuple(clean.x.shape[1:]), 0.15, 0.25, 'cpu', torch.Generator().manual_seed(c))
        g = torch.Generator().manual_seed(900 + c)
        m.eval()
        for _ in range(30):
            idx = torch.randint(0, len(clean), (64,), generator=g)
            x = clean.x[idx]
            # ascent on -CE(target c) == update with labels... implement directly
            d = up.delta.clone().requires_grad_(True)
            loss = -torch.nn.functional.cross_entropy(m((x + d[0]).clamp(0, 1)), torch.full((64,), c))
            (gr,) = torch.autograd.grad(loss, d)
            up.delta = up._ascent(d.detach(), gr)
        with torch.no_grad():
            p = m(up.apply(clean.x)).argmax(1)
        keep = clean.y != c
        rates.append(round(float((p[keep] == c).float().mean()), 3))
    out["targeted0.15"] = rates
    out["eval"] = evaluate(m, target, runtime=Runtime(device='cpu', progress=False), poisoned=pois)
    print(json.dumps(out), flush=True)
probes(model, "before")
for rs in map(int, sys.argv[2:]):
    rt = Runtime(device='cpu', seed=rs, progress=False)
    pm, masks, hist, ex = purify(model, clean, recipe('default'), rt)
    probes(pm, f"rs{rs}")
