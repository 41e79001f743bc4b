"""Running mean and variance of a stream of tensors, merged batch by batch in float64.

Batches are combined with the pairwise update of Chan, Golub & LeVeque (1979), which stays exact where
a running sum of squares would cancel. Used for latent statistics, the per-position activity of
`vaekit inspect` and the image-wide GroupNorm statistics of tiling.
"""


class RunningMoments:
    """Count, mean and sum of squared deviations (m2), elementwise over a fixed shape."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, None, None

    def merge(self, count, mean, m2):
        """Merge the moments of another part: `count` values with mean `mean` and squared deviations `m2`."""
        if count == 0:
            return self
        mean, m2 = mean.double(), m2.double()
        if self.mean is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return self
        if mean.shape != self.mean.shape:
            raise ValueError(f"moments of shape {tuple(mean.shape)} merged into {tuple(self.mean.shape)}")
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * count / total)
        self.count = total
        return self

    def add(self, x, dim):
        """Add the values of `x` reduced over `dim` (an int or tuple): the moments keep x's other dimensions."""
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        x = x.detach().double()
        count = 1
        for d in dims:
            count *= x.shape[d]
        if count == 0:
            return self
        mean = x.mean(dim=dims)
        m2 = (x - x.mean(dim=dims, keepdim=True)).square().sum(dim=dims)
        return self.merge(count, mean, m2)

    def variance(self, correction=0):
        """m2 / (count - correction): the population variance by default."""
        return self.m2 / (self.count - correction)
