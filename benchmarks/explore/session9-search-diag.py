"""Does a universal search on the frozen backdoored model find the trigger? flip rate to target,
and the share of |delta| mass on the trigger's pixels."""
import sys, torch, json
sys.path.insert(0, 'benchmarks')
from nft.io import load_model
from nft.runs import attack_from_run, clean_set, dataset_of
from nft.searches import UniversalPerturbation, SparsePerturbation
torch.set_num_threads(1)
for run in sys.argv[1:]:
    model, man = load_model(run); model.eval()
    data = dataset_of(man); attack = attack_from_run(run, man)
    clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=50, seed=0)
    f = lambda t: t.float() / 255 if t.dtype == torch.uint8 else t.float()
    x, y = f(clean.x), clean.y
    xt, _ = attack.apply(x[:200], y[:200]); trig = ((f(xt) - x[:200]).abs().mean(0) > 0.05).float()
    tgt = int(man.get('config', {}).get('target', 0)) if isinstance(man.get('config'), dict) else 0
    for name, cls, eps in [("l2", UniversalPerturbation, 0.15), ("l2", UniversalPerturbation, 0.25),
                           ("l1", SparsePerturbation, 0.05), ("l1", SparsePerturbation, 0.08)]:
        for seed in (0, 1):
            g = torch.Generator().manual_seed(seed)
            s = cls(tuple(x.shape[1:]), eps, 0.25, 'cpu', g)
            for _ in range(100):
                idx = torch.randint(0, len(x), (32,), generator=g)
                s.update(model, x[idx], y[idx])
            with torch.no_grad():
                pred = model(s.apply(x)).argmax(1)
            nt = y != 0
            d = s.delta[0].abs()
            print(run.split('/')[-1][:10], name, eps, seed, "to0 %.1f" % (100 * float((pred[nt] == 0).float().mean())),
                  "acc %.1f" % (100 * float((pred == y).float().mean())), "mass-on-trigger %.2f" % float((d * trig).sum() / d.sum()),
                  "trigger-px %d" % int(trig.sum()), flush=True)
