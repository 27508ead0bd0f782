import time, jax, jax.numpy as jnp, numpy as np
jax.config.update('jax_enable_x64', True)
import dynamics as dyn
from dynamics import discrete
rng = np.random.default_rng(0); X = rng.normal(size=(12,3)); Y = rng.normal(size=12)
W0 = jnp.array([0.7, -0.4, 0.9])
def loss(w):
    r = jnp.asarray(X) @ w - jnp.asarray(Y)
    return jnp.mean(jnp.logaddexp(r, -r) - jnp.log(2.0))
g0 = jax.grad(loss)(W0)
cases = [
 ("GD->GF", discrete.GD, None, [0.2,0.1,0.05], 'learning_rate', None),
 ("GD->mod", discrete.GD, lambda a: dyn.ModifiedGradientFlow(a.eta), [0.2,0.1,0.05], 'learning_rate', None),
 ("GD->mod2", discrete.GD, lambda a: dyn.modified_second_order_flow(a.eta), [0.2,0.1,0.05], 'learning_rate', None),
 ("HB->mod", lambda e: discrete.HeavyBall(e, 0.5), lambda a: dyn.ModifiedHeavyBallFlow(a.eta, a.beta), [0.2,0.1,0.05], 'learning_rate', -g0/0.5),
 ("HB->mod2", lambda e: discrete.HeavyBall(e, 0.5), None, [0.2,0.1,0.05], 'learning_rate', -g0/0.5),
 ("NM->mod", lambda e: discrete.NesterovMomentum(e, 0.5), None, [0.2,0.1,0.05], 'learning_rate', -g0/0.5),
 ("NAGD", discrete.NAGD, None, [0.1**2,0.05**2,0.025**2], 'learning_rate', None),
 ("LF", discrete.Leapfrog, None, [0.1**2,0.05**2,0.025**2], 'time_step', None),
]
for name, a, f, sizes, ag, v0 in cases:
    t=time.time()
    ds = dyn.gap_order(a, W0, loss, sizes, 2.0, flow=f, against=ag, v0=v0)
    print(name, ds.attrs['order'], ds.attrs['order_ci_low'], ds.attrs['order_ci_high'], ds.gap.values, time.time()-t)
