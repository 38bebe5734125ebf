//! The server's copy of the model a client trained: the exact global weights of the update's
//! version, on an autodiff device, with the round's objective. Everything the attacks compute
//! with the model goes through here: gradients with respect to parameters (what a candidate
//! input would have sent), with respect to the input, and the DAL term's own gradient.

use mjp::burn::optim::GradientsParams;
use mjp::burn::tensor::{Device, Tensor, TensorData};
use mjp::jigsaw::JigsawPlan;
use mjp::params::NamedTensors;
use mjp::train::{Batch, compute_gradients_with_threads, objective};
use mjp::{Vit, VitConfig};

use crate::error::Result;

/// A model copy at given weights.
pub struct Victim {
    /// Architecture.
    pub vit: VitConfig,
    /// The weights.
    pub params: NamedTensors,
    /// DAL weight of the round.
    pub lambda: f64,
    model: Vit,
    device: Device,
}

impl Victim {
    /// Builds the model at `params` on `device` (with autodiff).
    pub fn new(
        vit: &VitConfig,
        params: &NamedTensors,
        lambda: f64,
        device: mjp::DeviceSpec,
    ) -> Result<Self> {
        let device = device.device()?.autodiff();
        let model = mjp::checkpoint::model_from_params(vit, params, &device)?;
        Ok(Self {
            vit: vit.clone(),
            params: params.clone(),
            lambda,
            model,
            device,
        })
    }

    /// The same model at other weights (`params + scale * direction`), reusing this one.
    pub fn at(&self, direction: &NamedTensors, scale: f32) -> Result<Self> {
        let mut shifted = direction.clone();
        shifted.scale(scale);
        self.with_params(self.params.add(&shifted)?)
    }

    /// The same model at the weights `params`, reusing this one.
    pub fn with_params(&self, params: NamedTensors) -> Result<Self> {
        let model = params.load_into(self.model.clone(), None)?;
        Ok(Self {
            vit: self.vit.clone(),
            params,
            lambda: self.lambda,
            model,
            device: self.device.clone(),
        })
    }

    fn batch(&self, images: &[f32], labels: &[u32]) -> Batch {
        Batch::new(images.to_vec(), labels.to_vec(), &self.vit, &self.device)
    }

    /// The parameter gradient a client holding `images` would send (one FedSGD step).
    pub fn parameter_gradient(
        &self,
        images: &[f32],
        labels: &[u32],
        plan: Option<&JigsawPlan>,
    ) -> NamedTensors {
        let batch = self.batch(images, labels);
        let g = compute_gradients_with_threads(
            &self.model,
            &batch,
            plan.cloned(),
            self.lambda,
            false,
            1,
        );
        NamedTensors::gradients_of(&self.model, &g.grads)
    }

    /// `(loss, dL/dx)` at `images`.
    pub fn input_gradient(
        &self,
        images: &[f32],
        labels: &[u32],
        plan: Option<&JigsawPlan>,
    ) -> (f64, Vec<f32>) {
        let (value, dx, _) = self.backward(images, labels, plan);
        (value, dx)
    }

    /// The parameter gradient and `dL/dx` at `images`, from one backward pass.
    pub fn gradients(
        &self,
        images: &[f32],
        labels: &[u32],
        plan: Option<&JigsawPlan>,
    ) -> (NamedTensors, Vec<f32>) {
        let (_, dx, grads) = self.backward(images, labels, plan);
        let params = GradientsParams::from_grads(grads, &self.model);
        (NamedTensors::gradients_of(&self.model, &params), dx)
    }

    /// One backward pass of the round's objective at `images`: loss, `dL/dx`, every gradient.
    fn backward(
        &self,
        images: &[f32],
        labels: &[u32],
        plan: Option<&JigsawPlan>,
    ) -> (f64, Vec<f32>, mjp::burn::tensor::Gradients) {
        let batch = self.batch(images, labels);
        let x = batch.images.clone().require_grad();
        let loss = objective(
            &self.model,
            x.clone(),
            batch.labels.clone(),
            plan,
            self.lambda,
            false,
        );
        let value = mjp::train::scalar(&loss.total);
        let grads = loss.total.backward();
        let dx = x
            .grad(&grads)
            .map(|g| mjp::params::tensor_values(&g))
            .unwrap_or_else(|| vec![0.0; images.len()]);
        (value, dx, grads)
    }

    /// `lambda * dDAL/dE` for the PE table (rows x D, row-major), with `plan`'s occlusion.
    pub fn dal_pe_gradient(&self, plan: Option<&JigsawPlan>) -> Option<Vec<f32>> {
        let table = self.model.pos_embed.as_ref()?;
        let dal = self.model.dal_loss(plan, false)?;
        let grads = dal.mul_scalar(self.lambda).backward();
        table
            .val()
            .grad(&grads)
            .map(|g| mjp::params::tensor_values(&g))
    }

    /// Softmax predictions for images (no gradient).
    pub fn predict(&self, images: &[f32], n: usize) -> Vec<u32> {
        let s = self.vit.image_size;
        let x = Tensor::<4>::from_data(
            TensorData::new(images.to_vec(), [n, self.vit.channels, s, s]),
            &self.device,
        );
        mjp::model::predictions(&self.model.forward(x, None).logits)
    }
}
