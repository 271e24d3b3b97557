# Diagnostic only, not a defense: it knows CBA's classes (A=1, B=2 for target 0). Needs the code of
# session7-composite-search.patch applied (git apply on commit 02d8226; it was reverted, see NOTES §13). Question: can
# NFT's masks unlearn the composite at all when fed the trigger's own composites with labels by area?
import sys, torch, json
sys.argv = [sys.argv[0]] + sys.argv[1:]
import nft.searches as S
orig = S.CompositeSearch.update
@torch.no_grad()
def update(self, model, x, y, k):
    n, dev = len(x), x.device
    a = torch.arange(n).repeat(self.pool)
    b = torch.cat([torch.randperm(n, generator=self.g) for _ in range(self.pool)])
    import nft.augment as A
    comp, share = A.strip_pairs(x[a], x[b], self.g, 0.4, 0.6)
    ok = ((y[a] == 1) & (y[b] == 2)) | ((y[a] == 2) & (y[b] == 1))
    top = ok.nonzero().flatten()[:k]
    ya, yb = (A.soft_targets(t, self.num_classes) for t in (y[a][top], y[b][top]))
    s = share[top][:, None]
    return comp[top], s * ya + (1 - s) * yb
S.CompositeSearch.update = update
sys.path.insert(0, 'benchmarks')
import runpy
runpy.run_path('benchmarks/explore_nft.py', run_name='__main__')
