import json,glob,statistics as st
recs={}
for d in ('seed3','seed4'):
    for f in glob.glob(f'benchmarks/results/mnist10k/{d}/records/*nft_default-n50-*.json'):
        r=json.load(open(f)); recs[(r['attack'],r['seed'])]=r
    for f in glob.glob(f'benchmarks/results/mnist10k/superseded/session27-issba-heldout-old-fit/{d}/*nft_default-n50-*.json'):
        r=json.load(open(f)); recs[(r['attack'],r['seed'])]=r
old={}
for l in open('runs/x/s28/test.jsonl'):
    x=json.loads(l)
    if x['try']!='recipe=default': old[x['run']]=x
rows=[]
for l in open('runs/x/s28/test2.jsonl'):
    x=json.loads(l); name=x['run'].split('/')[-1]; a=name.split('-s')[0]; s=int(name.split('-s')[1].split('-')[0]); r=recs[(a,s)]
    o=old[x['run']]
    tp=x.get('target_probe') or {}
    row=(a,s,x['after']['acc']-x['before']['acc'],x['after']['asr'],o['after']['acc']-o['before']['acc'],o['after']['asr'],r['acc']-r['before']['acc'],r['asr'],tp.get('to'),tp.get('margin'),x.get('search_target'))
    rows.append(row)
    print(f"{a:10} s{s} probe->{row[8]} (margin {row[9]}; vote {row[10]})  probe arm {row[2]:+.2f}/{row[3]:.2f}  vote arm {row[4]:+.2f}/{row[5]:.2f}  default {row[6]:+.2f}/{row[7]:.2f}")
if rows:
    m=lambda i: round(st.fmean(r[i] for r in rows),2)
    print(len(rows),'probe arm',m(2),m(3),'vote arm',m(4),m(5),'default',m(6),m(7))
