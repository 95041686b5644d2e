"""The seed's Probabilistic U-Net in plain PyTorch, written from spec/model.md.

It is the reference that probunet is checked against (scripts/parity.py) and the baseline
that the benchmarks race. Parameter names match probunet's variable store, so weights
exported by probunet load with `load_state_dict`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def truncated_normal_(tensor, std=0.001):
    nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-2 * std, b=2 * std)


def conv(c_in, c_out, kernel, init):
    layer = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2)
    if init == "kaiming":
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        truncated_normal_(layer.bias)
    elif init == "head":
        nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")
        nn.init.normal_(layer.bias)
    else:
        nn.init.orthogonal_(layer.weight)
        truncated_normal_(layer.bias)
    return layer


class DownBlock(nn.Module):
    def __init__(self, c_in, c_out, pool, convs=3):
        super().__init__()
        self.pool = pool
        # Registered as attributes "0", "1", "2" so names read `...<block>.<conv>.weight`.
        for i in range(convs):
            self.add_module(str(i), conv(c_in if i == 0 else c_out, c_out, 3, "kaiming"))
        self.convs = convs

    def forward(self, x):
        if self.pool:
            x = F.avg_pool2d(x, 2, 2, 0, ceil_mode=True)
        for i in range(self.convs):
            x = F.relu(getattr(self, str(i))(x))
        return x


class Encoder(nn.ModuleList):
    """The down path; a plain list so parameter names read `<encoder>.<block>.<conv>`."""

    def __init__(self, c_in, filters):
        super().__init__(DownBlock(c_in if i == 0 else filters[i - 1], f, pool=i != 0) for i, f in enumerate(filters))

    def levels(self, x):
        out = []
        for block in self:
            x = block(x)
            out.append(x)
        return out

    def forward(self, x):
        return self.levels(x)[-1]


class UNet(nn.Module):
    def __init__(self, c_in, filters):
        super().__init__()
        self.down = Encoder(c_in, filters)
        self.up = nn.ModuleList(
            DownBlock(filters[i + 1] + filters[i], filters[i], pool=False)
            for i in reversed(range(len(filters) - 1))
        )

    def forward(self, x):
        levels = self.down.levels(x)
        out = levels[-1]
        for block, skip in zip(self.up, reversed(levels[:-1])):
            out = F.interpolate(out, scale_factor=2, mode="bilinear", align_corners=True)
            out = block(torch.cat([out, skip], 1))
        return out


class AxisAlignedConvGaussian(nn.Module):
    def __init__(self, c_in, filters, latent_dim, log_sigma_clamp=None):
        super().__init__()
        self.encoder = Encoder(c_in, filters)
        self.head = conv(filters[-1], 2 * latent_dim, 1, "head")
        self.latent_dim = latent_dim
        self.log_sigma_clamp = log_sigma_clamp

    def forward(self, x):
        params = self.head(self.encoder(x).mean(dim=(2, 3), keepdim=True)).flatten(1)
        mu, log_sigma = params[:, : self.latent_dim], params[:, self.latent_dim :]
        if self.log_sigma_clamp is not None:
            log_sigma = log_sigma.clamp(-self.log_sigma_clamp, self.log_sigma_clamp)
        return mu, log_sigma


class Fcomb(nn.Module):
    def __init__(self, features, latent_dim, convs, classes):
        super().__init__()
        self.layers = nn.ModuleList(
            conv(features + latent_dim if i == 0 else features, features, 1, "orthogonal") for i in range(convs - 1)
        )
        self.last = conv(features, classes, 1, "orthogonal")

    def forward(self, features, z):
        h, w = features.shape[2:]
        x = torch.cat([features, z[:, :, None, None].expand(-1, -1, h, w)], 1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.last(x)


def kl_diagonal(mu_q, log_sigma_q, mu_p, log_sigma_p):
    """KL(q || p) of diagonal Gaussians, summed over the latent dimensions."""
    q = torch.distributions.Independent(torch.distributions.Normal(mu_q, log_sigma_q.exp()), 1)
    p = torch.distributions.Independent(torch.distributions.Normal(mu_p, log_sigma_p.exp()), 1)
    return torch.distributions.kl_divergence(q, p)


class ProbUNet(nn.Module):
    def __init__(self, filters=(32, 64, 128, 192), latent_dim=2, fcomb_convs=4, beta=10.0,
                 reconstruction="sum", log_sigma_clamp=None, l2_weight=1e-5, input_channels=1, num_classes=1):
        super().__init__()
        filters = list(filters)
        self.unet = UNet(input_channels, filters)
        self.prior = AxisAlignedConvGaussian(input_channels, filters, latent_dim, log_sigma_clamp)
        self.posterior = AxisAlignedConvGaussian(input_channels + num_classes, filters, latent_dim, log_sigma_clamp)
        self.fcomb = Fcomb(filters[0], latent_dim, fcomb_convs, num_classes)
        self.beta = beta
        self.reconstruction = reconstruction
        self.l2_weight = l2_weight

    @classmethod
    def from_config(cls, config):
        """The model of probunet's model config (its JSON, as a dict)."""
        keys = ("filters", "latent_dim", "fcomb_convs", "beta", "reconstruction", "log_sigma_clamp",
                "l2_weight", "input_channels", "num_classes")
        return cls(**{key: config[key] for key in keys})

    def reg(self):
        params = list(self.posterior.parameters()) + list(self.prior.parameters()) + list(self.fcomb.layers.parameters())
        return sum(p.norm(2) for p in params)

    def elbo(self, image, mask, z=None):
        """Every term of the ELBO; z is drawn from the posterior unless given."""
        prior = self.prior(image)
        posterior = self.posterior(torch.cat([image, mask], 1))
        features = self.unet(image)
        if z is None:
            mu, log_sigma = posterior
            z = mu + log_sigma.exp() * torch.randn_like(mu)
        logits = self.fcomb(features, z)
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        if self.reconstruction == "sum":
            rec = bce.sum()
        else:
            rec = bce.sum(dim=(1, 2, 3)).mean()
        kl = kl_diagonal(*posterior, *prior).mean()
        elbo = -(rec + self.beta * kl)
        reg = self.reg()
        loss = -elbo + self.l2_weight * reg
        return dict(loss=loss, elbo=elbo, kl=kl, reconstruction=rec, reg=reg, logits=logits,
                    prior_mu=prior[0], prior_sigma=prior[1].exp(),
                    posterior_mu=posterior[0], posterior_sigma=posterior[1].exp())

    @torch.no_grad()
    def sample(self, image, n, eps=None):
        """Logits [B, n, classes, H, W]: prior and U-Net once per image, fcomb per sample.

        eps, standard-normal noise [B, n, latent_dim], is drawn unless given."""
        mu, log_sigma = self.prior(image)
        features = self.unet(image)
        b = image.shape[0]
        if eps is None:
            eps = torch.randn(b, n, mu.shape[1], device=image.device)
        z = mu[:, None] + log_sigma.exp()[:, None] * eps.to(mu)
        feats = features[:, None].expand(-1, n, -1, -1, -1).flatten(0, 1)
        logits = self.fcomb(feats, z.flatten(0, 1))
        return logits.view(b, n, *logits.shape[1:])


def parameter_count(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


if __name__ == "__main__":
    for latent in (2, 6):
        m = ProbUNet(latent_dim=latent)
        parts = {k: parameter_count(getattr(m, k)) for k in ("unet", "prior", "posterior", "fcomb")}
        print(latent, parts, parameter_count(m), math.fsum(parts.values()))
