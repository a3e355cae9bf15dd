import sys,collections
lines=[l for l in open(sys.argv[1]) if l.startswith('TRACE ') and not l.startswith('TRACE block')]
sets=collections.defaultdict(list); seen=collections.Counter()
for l in lines:
    _,b,i,k,layer,s,w,d=l.split(); b,i,k,layer,s,w,d=map(int,(b,i,k,layer,s,w,d))
    if i==0: seen[b]+=1
    if seen[b]==1: sets[b].append((i,k,layer,s,w,d))
names={0:'embed',1:'qkv',2:'attn',3:'proj',4:'fc',5:'mlp',6:'logits'}
agg=collections.defaultdict(lambda:[0,0,0])
for b in sets:
    for (i,k,layer,s,w,d) in sets[b]:
        a=agg[k]; a[0]+=1; a[1]+=w-s; a[2]+=d-w
for k,(n,wt,wk) in sorted(agg.items()):
    print(f"{names[k]:7s} {n:4d} tasks  avg wait {wt/n/1000:6.2f} us  avg work {wk/n/1000:6.2f} us")
b0=sets[min(sets)]
qs=[s for (i,k,layer,s,w,d) in b0 if k==1]
if len(qs)>1: print("per layer (block", min(sets), ")", round((qs[-1]-qs[0])/1000/(len(qs)-1),2), "us")
for (i,k,layer,s,w,d) in b0[:8]:
    print(f"  {names[k]:6s} L{layer:2d} start {s/1000:8.2f} wait {(w-s)/1000:6.2f} work {(d-w)/1000:6.2f}")
