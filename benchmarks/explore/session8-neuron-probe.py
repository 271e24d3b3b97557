"""Neuron probe: under an ANP-style perturbation (eps, K signed steps up the clean CE) of a fresh set of
masks on the model, how many clean images go to one class?"""
import sys, torch, json
sys.path.insert(0, __import__('os').path.join(__import__('os').path.dirname(__file__), '..'))
from nft.io import load_model
from nft.runs import attack_from_run, clean_set, dataset_of
from nft.purify import purify, recipe
from nft.runtime import Runtime
from nft.evaluate import evaluate, poisoned_test_set
from nft.masks import attach
from halves import halves
torch.set_num_threads(1)
run = sys.argv[1]; pc = int(sys.argv[2])
model, man = load_model(run); data = dataset_of(man); attack = attack_from_run(run, man)
clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=pc, seed=0)
target = halves(data.test, data.num_classes)[0]; pois = poisoned_test_set(target, attack)
import copy
def nprobe(m0, eps, steps, seed=0):
    m = copy.deepcopy(m0).eval()
    for p in m.parameters(): p.requires_grad_(False)
    masks = attach(m, 'auto')
    g = torch.Generator().manual_seed(seed)
    sites = masks.sites
    hb = [s.kind == "norm" and getattr(s.module, "bias", None) is not None for s in sites]
    d = [(torch.rand(s.mask.shape, generator=g) * 2 - 1) * eps for s in sites]
    e = [(torch.rand(s.mask.shape, generator=g) * 2 - 1) * eps if b else None for s, b in zip(sites, hb)]
    x, y = clean.x, clean.y
    for _ in range(steps):
        live = [t.requires_grad_(True) for t in d + e if t is not None]
        masks.set_noise(d, e)
        gr = iter(torch.autograd.grad(torch.nn.functional.cross_entropy(m(x), y), live))
        up = lambda t: None if t is None else (t.detach() + (eps / steps) * next(gr).sign()).clamp(-eps, eps)
        d, e = [up(t) for t in d], [up(t) for t in e]
    masks.set_noise(d, e)
    with torch.no_grad():
        p = m(x).argmax(1)
    masks.set_noise(None)
    sent = torch.bincount(p[p != y], minlength=10).float() / (len(y) - torch.bincount(y, minlength=10)).float()
    return [round(float(v), 3) for v in sent]
def report(m, tag):
    out = {"tag": tag, "eval": evaluate(m, target, runtime=Runtime(device='cpu', progress=False), poisoned=pois)}
    for eps in (0.2, 0.4):
        out[f"n{eps}"] = nprobe(m, eps, 5)
    print(json.dumps(out), flush=True)
report(model, "before")
for rs in map(int, sys.argv[3:]):
    pm = purify(model, clean, recipe('default'), Runtime(device='cpu', seed=rs, progress=False))[0]
    report(pm, f"rs{rs}")
