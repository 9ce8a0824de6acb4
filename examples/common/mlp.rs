//! The tiny model both examples train: `y = w2 . tanh(W1 x + b1) + b2` on synthetic data.

#![allow(dead_code, unreachable_pub)]

pub const IN: usize = 16;
pub const HIDDEN: usize = 32;
pub const BATCH: usize = 64;

/// Parameters, flat: W1, b1, w2, b2.
pub struct Mlp {
    pub p: Vec<f32>,
}

impl Mlp {
    pub const LEN: usize = HIDDEN * IN + HIDDEN + HIDDEN + 1;

    pub fn new() -> Self {
        // Every peer starts from the same parameters: a fixed seed.
        let mut rng = Rng(42);
        let p = (0..Self::LEN).map(|_| rng.normal() * 0.3).collect();
        Mlp { p }
    }

    /// Loss and gradient (written into `grad`) of the mean squared error over a batch.
    pub fn loss_grad(&self, xs: &[[f32; IN]], ys: &[f32], grad: &mut [f32]) -> f32 {
        grad.fill(0.0);
        let (w1, rest) = self.p.split_at(HIDDEN * IN);
        let (b1, rest) = rest.split_at(HIDDEN);
        let (w2, b2) = rest.split_at(HIDDEN);
        let mut loss = 0.0;
        let n = xs.len() as f32;
        for (x, y) in xs.iter().zip(ys) {
            let mut h = [0f32; HIDDEN];
            for j in 0..HIDDEN {
                let z: f32 = b1[j] + (0..IN).map(|i| w1[j * IN + i] * x[i]).sum::<f32>();
                h[j] = z.tanh();
            }
            let out = b2[0] + (0..HIDDEN).map(|j| w2[j] * h[j]).sum::<f32>();
            let err = out - y;
            loss += err * err / n;
            let d_out = 2.0 * err / n;
            let (gw1, grest) = grad.split_at_mut(HIDDEN * IN);
            let (gb1, grest) = grest.split_at_mut(HIDDEN);
            let (gw2, gb2) = grest.split_at_mut(HIDDEN);
            gb2[0] += d_out;
            for j in 0..HIDDEN {
                gw2[j] += d_out * h[j];
                let dz = d_out * w2[j] * (1.0 - h[j] * h[j]);
                gb1[j] += dz;
                for i in 0..IN {
                    gw1[j * IN + i] += dz * x[i];
                }
            }
        }
        loss
    }

    pub fn hash(&self) -> u64 {
        hash_f32(&self.p)
    }
}

/// FNV-1a over the bits of a slice of floats.
pub fn hash_f32(v: &[f32]) -> u64 {
    v.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
        (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// A small deterministic generator (xorshift64*), so the examples need no extra crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    pub fn normal(&mut self) -> f32 {
        (0..6).map(|_| self.uniform()).sum::<f32>() / 2.0
    }
    /// A batch of inputs and targets.
    pub fn batch(&mut self) -> (Vec<[f32; IN]>, Vec<f32>) {
        let xs: Vec<[f32; IN]> = (0..BATCH)
            .map(|_| std::array::from_fn(|_| self.uniform()))
            .collect();
        let ys = xs.iter().map(target).collect();
        (xs, ys)
    }
}

/// The function to learn.
pub fn target(x: &[f32; IN]) -> f32 {
    (x[0] * 1.5).sin() + x[1] * x[2] - 0.5 * x[3]
}

/// The launchers' last check: the loss (first to last as printed) fell.
pub fn check_loss_fell(losses: &[f32]) -> Result<(), String> {
    match (losses.first(), losses.last()) {
        (Some(first), Some(last)) if last < first => {
            println!("loss fell from {first:.6} to {last:.6}");
            Ok(())
        }
        _ => Err(format!(
            "the loss did not fall over {} steps: {losses:?}",
            losses.len()
        )),
    }
}
