import json,glob,sys
# held-out arm (test.jsonl, --eval test) against the committed bench records of default at 50/class
recs={}
for d in ('seed3','seed4'):
    for f in glob.glob(f'benchmarks/results/mnist10k/{d}/records/*nft_default-n50-*.json'):
        r=json.load(open(f)); recs[(r['attack'],r['seed'])]=r
    for f in glob.glob(f'benchmarks/results/mnist10k/superseded/session27-issba-heldout-old-fit/{d}/*nft_default-n50-*.json'):
        r=json.load(open(f)); recs[(r['attack'],r['seed'])]=r  # runs/g holds the old-fit ISSBA builds
rows=[]
for l in open('runs/x/s28/test.jsonl'):
    x=json.loads(l); name=x['run'].split('/')[-1]; a=name.split('-s')[0]; s=int(name.split('-s')[1].split('-')[0])
    r=recs[(a,s)]
    dA=x['after']['acc']-x['before']['acc']; dR=r['acc']-r['before']['acc']
    tag='default' if x['try']=='recipe=default' else 'arm'
    rows.append((tag,a,s,dA,x['after']['asr'],dR,r['asr'],x.get('search_target'), bool((x.get('patch_probe') or {}).get('flagged'))))
    print(f"{tag:8}{a:11}s{s}  arm {dA:+6.2f} / {x['after']['asr']:6.2f}   record {dR:+6.2f} / {r['asr']:6.2f}  flagged={rows[-1][-1]}")
arm=[r for r in rows if r[0]=='arm']
if arm:
    import statistics as st
    print('n',len(arm),'arm mean', round(st.fmean(r[3] for r in arm),3), round(st.fmean(r[4] for r in arm),3),
          'records', round(st.fmean(r[5] for r in arm),3), round(st.fmean(r[6] for r in arm),3))
