import os, sys, time, json, functools
import numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, "/tmp/prof")
from medgemma_core import training as T
V, D = 262144, 640
rng = np.random.default_rng(0)
W = jnp.asarray(rng.standard_normal((V, D), np.float32) * 0.02)

def new_loss(h, w, y, chunk, want_dw):
    n = h.shape[0]; c = min(chunk, n); pad = -n % c
    hp = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, c, D); yp = jnp.pad(y, (0, pad), constant_values=-100).reshape(-1, c)
    def body(carry, xs):
        tot, dw = carry; x, t = xs
        logits = jnp.einsum("nd,vd->nv", x, w, preferred_element_type=jnp.float32)
        m = jnp.max(logits, -1, keepdims=True)
        e = jnp.exp(logits - m); s = jnp.sum(e, -1, keepdims=True)
        lse = (m + jnp.log(s))[:, 0]
        valid = t >= 0; tt = jnp.maximum(t, 0)
        wy = w[tt]  # [c, D]
        picked = jnp.sum(x * wy, -1)
        tot = tot + jnp.sum(jnp.where(valid, lse - picked, 0.))
        p = e * (valid[:, None] / s)
        dx = jnp.einsum("nv,vd->nd", p, w, preferred_element_type=jnp.float32) - wy * valid[:, None]
        if want_dw:
            dw = dw + jnp.einsum("nv,nd->vd", p, x) 
            dw = dw.at[tt].add(-x * valid[:, None])
        return (tot, dw), dx
    dw0 = jnp.zeros_like(w) if want_dw else None
    (tot, dw), dx = jax.lax.scan(body, (jnp.zeros(()), dw0), (hp, yp))
    return tot, dx.reshape(-1, D)[:n], dw

variants = {}
import old_training as O
def mk(fn):
  def cur(h, w, y, chunk, want_dw):
    f = lambda h, w: fn(h, w, y, chunk)
    if want_dw:
        l, (dh, dw) = jax.value_and_grad(f, argnums=(0, 1))(h, w); return l, dh, dw
    l, dh = jax.value_and_grad(f)(h, w); return l, dh, None
  return cur
variants["old"] = mk(lambda h, w, y, c: O._chunked_loss(h, w, y, c, None))
variants["current"] = mk(lambda h, w, y, c: T._token_losses(h, w, y, c, None))
variants["new"] = new_loss
n = int(sys.argv[1]); chunk = int(sys.argv[2]); want_dw = sys.argv[3] == "1"; names = sys.argv[4:] or list(variants)
h = jnp.asarray(rng.standard_normal((n, D), np.float32))
yn = rng.integers(0, V, n).astype(np.int32)
nv = int(os.environ.get("NVALID", n)); yn[nv:] = -100
y = jnp.asarray(yn)
out = {}
ref = None
for name in names:
    f = jax.jit(functools.partial(variants[name], chunk=chunk, want_dw=want_dw))
    c = f.lower(h, W, y).compile()
    cost = c.cost_analysis(); cost = cost[0] if isinstance(cost, list) else cost
    r = jax.block_until_ready(c(h, W, y))
    if ref is None: ref = r
    else: print(name, "diff loss", float(abs(r[0]-ref[0])/abs(ref[0])), "dh", float(jnp.max(abs(r[1]-ref[1]))/jnp.max(abs(ref[1]))))
    ts = []
    for _ in range(2):
        t, cp = time.perf_counter(), time.process_time(); jax.block_until_ready(c(h, W, y)); ts.append((time.perf_counter()-t, time.process_time()-cp))
    out[name] = {"wall": round(min(x[0] for x in ts), 3), "cpu": round(min(x[1] for x in ts), 3), "gflop": round(cost["flops"]/1e9), "temp_mb": c.memory_analysis().temp_size_in_bytes >> 20}
print(n, chunk, want_dw, json.dumps(out))
