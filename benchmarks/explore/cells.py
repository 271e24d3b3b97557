"""Shared by the session 18-19 diagnostics: a grid cell's purified model rebuilt from the masks it saved."""
import copy

from nft.masks import attach


def folded_masks(original, state, where=('auto', 'weight')):
    """A copy of ``original`` with the mask ``state`` folded in (the first mask layout in ``where`` that takes it:
    a cell whose composite probe flagged a pair learned per-weight masks); BN statistics still the original's."""
    for w in where:
        m = copy.deepcopy(original)
        masks = attach(m, w)
        try:
            masks.load_state_dict(state)
        except Exception:
            continue
        masks.fold()
        return m
    raise ValueError(f"no mask layout in {where} takes this state")


def one_shot_cells(shard=0, nshards=1, seeds='012'):
    """Yield, for this shard of the 1/class NFT `default` cells in runs/g (seeds among ``seeds``): the record, the
    backdoored model, its run directory and manifest, its data, the cell's ten clean images and the dev half."""
    import glob
    import json
    from halves import halves
    from nft.io import load_model
    from nft.runs import clean_set, dataset_of
    files = sorted(f for f in glob.glob('runs/g/records/*nft_default-n1-*.json') if f.split('-n1-s')[1][0] in seeds)
    for f in files[shard::nshards]:
        r = json.load(open(f))
        run = 'runs/g/' + r['artifacts']['backdoored']
        model, man = load_model(run)
        data = dataset_of(man)
        clean = clean_set(data.heldout, data.num_classes, data.augment, per_class=1, seed=r['seed'])
        yield r, model, run, man, data, clean, halves(data.test, data.num_classes)[0]
