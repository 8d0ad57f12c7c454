//! Dispatch planning and recording: row chunks within the binding limit, 2-D grids, and the
//! forward, backward and dγ/dβ passes over a backend's buffers.

use std::num::NonZeroU64;

use layernorm_core::{Backward, Error, Forward, NormSpec, Residual, Result};

use crate::kernels::{CW, Flags, Io, Kernel, Shape};
use crate::{WgpuBackend, WgpuBuffer, device_err};

/// One dispatch's share of the rows: `rows` rows starting at `row0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Chunk {
    row0: usize,
    rows: usize,
}

/// A binding of `bytes` bytes of `buffer` from `offset`, rounded up to 4 and at least 16 bytes
/// where the buffer allows (the backend's buffers are padded so that it does).
pub(crate) fn bind(buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> wgpu::BindingResource<'_> {
    let size = (bytes.div_ceil(4) * 4).max(16).min(buffer.size().saturating_sub(offset)).max(4);
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset,
        size: NonZeroU64::new(size),
    })
}

/// A binding of `b`'s bytes like [`bind`], or of all of `dummy` where the tensor is absent.
fn opt_bind<'a>(
    b: Option<&'a WgpuBuffer>,
    dummy: &'a wgpu::Buffer,
    offset: u64,
    bytes: u64,
) -> wgpu::BindingResource<'a> {
    match b {
        Some(b) => bind(&b.buffer, offset, bytes),
        None => dummy.as_entire_binding(),
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// One entry of a bind group.
pub(crate) fn entry(binding: u32, resource: wgpu::BindingResource<'_>) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry { binding, resource }
}

impl WgpuBackend {
    /// Splits `rows` rows of `row_bytes` bytes into dispatches whose bindings stay within the
    /// device's `max_storage_buffer_binding_size`, each starting at a row whose byte offsets (in
    /// the data and in the f32 per-row statistics) are multiples of the offset alignment.
    fn chunks(&self, spec: &NormSpec, row_bytes: u64) -> Result<Vec<Chunk>> {
        let rows = spec.rows;
        let too_large = || Error::TooLarge {
            rows,
            n: spec.n,
            limit: format!(
                "the device's max_storage_buffer_binding_size ({} bytes) with {}-byte offset \
                 alignment",
                self.max_binding, self.offset_align
            ),
        };
        // A row also has 4 bytes of mean, rstd (and lo): bound by the larger of the two.
        let fit = (self.max_binding / row_bytes.max(4)) as usize;
        if rows <= fit {
            return Ok(vec![Chunk { row0: 0, rows }]);
        }
        let a = self.offset_align;
        let stat_unit = (a / 4).max(1);
        let data_unit = a / gcd(row_bytes, a);
        let unit = (stat_unit / gcd(stat_unit, data_unit) * data_unit) as usize;
        let per = fit / unit * unit;
        if per == 0 {
            return Err(too_large());
        }
        Ok((0..rows).step_by(per).map(|row0| Chunk { row0, rows: per.min(rows - row0) }).collect())
    }

    /// A grid of at least `groups` workgroups: (x, y) with x ≤ the per-dimension limit.
    pub(crate) fn grid(&self, groups: usize, spec: &NormSpec) -> Result<(u32, u32)> {
        let gx = groups.clamp(1, self.max_groups as usize);
        let gy = groups.div_ceil(gx).max(1);
        if gy > self.max_groups as usize {
            return Err(Error::TooLarge {
                rows: spec.rows,
                n: spec.n,
                limit: format!("{} workgroups per dimension", self.max_groups),
            });
        }
        Ok((gx as u32, gy as u32))
    }

    pub(crate) fn pipeline(
        &self,
        kernel: Kernel,
        io: Io,
        shape: Option<Shape>,
    ) -> Result<wgpu::ComputePipeline> {
        self.cache.pipeline(&self.device, kernel, io, shape, self.subgroups).map_err(device_err)
    }

    /// ε as the shaders take it: `(m, e)` with ε = m·2^e and m in [0.5, 1) rounded to f32, so
    /// that every ε from the smallest normal f32 to the largest f64 keeps its value; smaller ε
    /// is [`Error::Unsupported`] (the shaders compute in f32, where GPUs may flush subnormals).
    pub(crate) fn eps_parts(spec: &NormSpec) -> Result<(f32, i32)> {
        let eps = spec.eps;
        if eps < f64::from(f32::MIN_POSITIVE) {
            return Err(Error::unsupported(
                Self::NAME,
                format!(
                    "use eps = {eps:e}: the shaders compute in f32, whose smallest normal value \
                     is {:e} (GPUs may flush anything smaller to zero)",
                    f32::MIN_POSITIVE
                ),
            ));
        }
        let bits = eps.to_bits();
        let e = ((bits >> 52) & 0x7ff) as i32 - 1022;
        let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1022u64 << 52)) as f32;
        Ok(if m == 1.0 { (0.5, e + 1) } else { (m, e) })
    }

    /// Whether this adapter's driver flushes f32 subnormals to zero: taken to be so on wgpu's GL
    /// backend (Mesa's GL driver does; GLSL allows it), not on the others (lavapipe keeps them).
    pub(crate) fn flushes_subnormals(&self) -> bool {
        self.adapter_info().backend == wgpu::Backend::Gl
    }

    /// From ε = 2^252 to 2^300 every row's rstd = 1/√(var + ε) is an f32 subnormal (above 2^300
    /// it rounds to 0, as the reference does in f32). An adapter that flushes subnormals would
    /// save 0 for it, a wrong value, and scale a backward from y by it: [`Error::Unsupported`]
    /// there, for every pass.
    pub(crate) fn check_subnormal_rstd(&self, spec: &NormSpec) -> Result<()> {
        let (lo, hi) = (2f64.powi(252), 2f64.powi(300));
        if !self.flushes_subnormals() || spec.eps < lo || spec.eps >= hi {
            return Ok(());
        }
        Err(Error::unsupported(
            Self::NAME,
            format!(
                "use eps = {:e} on this adapter: from eps = 2^252 ({lo:e}) to 2^300 ({hi:e}) \
                 rstd = 1/sqrt(var + eps) is an f32 subnormal, which its driver flushes to zero",
                spec.eps
            ),
        ))
    }

    /// A backward from x forms x̂ = (x − mean)·rstd from the rstd the forward saved in f32.
    /// rstd = 1/√(var + ε) ≤ 1/√ε: from ε = 2^252 it lies below f32's normal range for every
    /// row, where GPUs flush it and x̂ cannot be recovered: [`Error::Unsupported`], naming the
    /// backward from y, which does not need it.
    pub(crate) fn check_saved_rstd(spec: &NormSpec, from_y: bool) -> Result<()> {
        let limit = 2f64.powi(252);
        if from_y || spec.eps < limit {
            return Ok(());
        }
        Err(Error::unsupported(
            Self::NAME,
            format!(
                "run a backward from x with eps = {:e}: from eps = 2^252 ({limit:e}) the saved \
                 f32 rstd = 1/sqrt(var + eps) lies below f32's normal range and cannot carry \
                 xhat (the backward from y can)",
                spec.eps
            ),
        ))
    }

    pub(crate) fn forward_impl(
        &self,
        spec: &NormSpec,
        a: &Forward<'_, WgpuBuffer>,
        eps: (f32, i32),
    ) -> Result<()> {
        let (rows, n) = (spec.rows, spec.n);
        if rows == 0 {
            return Ok(());
        }
        let io = Io::widest(spec.dtype, n);
        let nv = n / io.width();
        let shape = Shape::for_items(nv, self.loop_limit);
        let pipeline = self.pipeline(Kernel::Forward, io, Some(shape))?;
        let layout = pipeline.get_bind_group_layout(0);
        let es = spec.dtype.size() as u64;
        let row_bytes = n as u64 * es;
        let chunks = self.chunks(spec, row_bytes)?;
        let (res_in, h_out) = match &a.residual {
            Some(Residual::Add { residual, h }) => (Some(*residual), Some(&**h)),
            Some(Residual::InPlace(r)) => (None, Some(&**r)),
            None => (None, None),
        };
        let flags = Flags::default()
            .with(Flags::GAMMA, spec.gamma)
            .with(Flags::BETA, spec.beta)
            .with(Flags::RMS, !spec.has_mean())
            .with(Flags::RES_ADD, res_in.is_some())
            .with(Flags::RES_IN_PLACE, h_out.is_some() && res_in.is_none());
        let gamma = a.gamma.map_or(&self.dummy, |g| &g.buffer);
        let beta = a.beta.map_or(&self.dummy, |b| &b.buffer);
        let offset = spec.gamma_offset_acc() as f32;
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            for c in &chunks {
                let groups = c.rows.div_ceil(shape.rows_per_group() as usize);
                let (gx, gy) = self.grid(groups, spec)?;
                let params = self.uniform(&[
                    c.rows as u32,
                    nv as u32,
                    n as u32,
                    flags.0,
                    eps.0.to_bits(),
                    eps.1 as u32,
                    gx,
                    offset.to_bits(),
                ]);
                let (off, bytes) = (c.row0 as u64 * row_bytes, c.rows as u64 * row_bytes);
                let (soff, sbytes) = (c.row0 as u64 * 4, c.rows as u64 * 4);
                let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("layernorm forward"),
                    layout: &layout,
                    entries: &[
                        entry(0, params.as_entire_binding()),
                        entry(1, bind(&a.x.buffer, off, bytes)),
                        entry(2, bind(gamma, 0, row_bytes)),
                        entry(3, bind(beta, 0, row_bytes)),
                        entry(4, bind(&a.y.buffer, off, bytes)),
                        entry(5, opt_bind(a.mean.as_deref(), &self.dummy_out[0], soff, sbytes)),
                        entry(6, bind(&a.rstd.buffer, soff, sbytes)),
                        entry(7, opt_bind(res_in, &self.dummy, off, bytes)),
                        entry(8, opt_bind(h_out, &self.dummy_out[1], off, bytes)),
                    ],
                });
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
        }
        self.queue.submit([enc.finish()]);
        Ok(())
    }

    /// Bindings 0–6 of the backward row kernel and of the dγ/dβ pass, for chunk `c`: the
    /// parameters, the saved tensor (x or y), dy, γ, β (read from y only), the mean (LayerNorm
    /// from x only) and rstd.
    fn saved_entries<'a>(
        &'a self,
        spec: &NormSpec,
        a: &Backward<'a, WgpuBuffer>,
        params: &'a wgpu::Buffer,
        c: &Chunk,
        row_bytes: u64,
    ) -> Vec<wgpu::BindGroupEntry<'a>> {
        let from_y = a.saved.is_output();
        let gamma = a.gamma.map_or(&self.dummy, |g| &g.buffer);
        let beta = a.beta.filter(|_| from_y).map_or(&self.dummy, |b| &b.buffer);
        let mean = a.mean.filter(|_| spec.has_mean() && !from_y);
        let (off, bytes) = (c.row0 as u64 * row_bytes, c.rows as u64 * row_bytes);
        let (soff, sbytes) = (c.row0 as u64 * 4, c.rows as u64 * 4);
        vec![
            entry(0, params.as_entire_binding()),
            entry(1, bind(&a.saved.tensor().buffer, off, bytes)),
            entry(2, bind(&a.dy.buffer, off, bytes)),
            entry(3, bind(gamma, 0, row_bytes)),
            entry(4, bind(beta, 0, row_bytes)),
            entry(5, opt_bind(mean, &self.dummy, soff, sbytes)),
            entry(6, bind(&a.rstd.buffer, soff, sbytes)),
        ]
    }

    /// The flags of a backward: the kind, γ, and the variants.
    fn backward_flags(spec: &NormSpec, a: &Backward<'_, WgpuBuffer>) -> Flags {
        let from_y = a.saved.is_output();
        Flags::default()
            .with(Flags::GAMMA, spec.gamma)
            .with(Flags::BETA, spec.beta && from_y)
            .with(Flags::RMS, !spec.has_mean())
            .with(Flags::FROM_Y, from_y)
            .with(Flags::DH, a.dh.is_some())
    }

    pub(crate) fn backward_impl(
        &self,
        spec: &NormSpec,
        a: &Backward<'_, WgpuBuffer>,
    ) -> Result<()> {
        let (rows, n) = (spec.rows, spec.n);
        let es = spec.dtype.size() as u64;
        // Saturating: with no rows, n can be any size (no γ or β then).
        let row_bytes = (n as u64).saturating_mul(es);
        let param_bytes = row_bytes.div_ceil(4).saturating_mul(4).max(16);
        let mut enc = self.device.create_command_encoder(&Default::default());
        if rows == 0 {
            for b in [a.dgamma.as_deref(), a.dbeta.as_deref()].into_iter().flatten() {
                enc.clear_buffer(&b.buffer, 0, Some(param_bytes.min(b.buffer.size())));
            }
            self.queue.submit([enc.finish()]);
            return Ok(());
        }
        let chunks = self.chunks(spec, row_bytes)?;
        let lo = self.scratch(spec, rows as u64 * 4)?;
        let io = Io::widest(spec.dtype, n);
        let nv = n / io.width();
        let shape = Shape::for_items(nv, self.loop_limit);
        let rpg = shape.rows_per_group() as usize;
        let want_params = a.dgamma.is_some() || a.dbeta.is_some();

        // Rows per segment, and the dγ/dβ partials: fused into the row kernel when rows are
        // cached in registers (one partial per segment), else a separate pass (see param_pass).
        let fused = want_params && shape.k > 0;
        let max_parts = (self.max_binding / 4 / n as u64) as usize;
        let mut rps = if fused { (rows / (rpg * 128)).clamp(1, 32) } else { 1 };
        let segs = |rps: usize| chunks.iter().map(|c| c.rows.div_ceil(rps)).sum::<usize>();
        while fused && segs(rps) > max_parts && rps < rows {
            rps *= 2;
        }
        let parts = if fused { segs(rps) } else { 0 };
        if parts > max_parts {
            return Err(self.partials_too_large(spec));
        }
        let part_bytes = if fused { parts as u64 * n as u64 * 4 } else { 16 };
        let (part_g, part_b) = (self.scratch(spec, part_bytes)?, self.scratch(spec, part_bytes)?);

        let pipeline = self.pipeline(Kernel::Backward, io, Some(shape))?;
        let layout = pipeline.get_bind_group_layout(0);
        let flags = Self::backward_flags(spec, a).with(Flags::PARTIALS, fused);
        let offset = spec.gamma_offset_acc() as f32;
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            let mut part0 = 0usize;
            for c in &chunks {
                let segs_c = c.rows.div_ceil(rps);
                let (gx, gy) = self.grid(segs_c.div_ceil(rpg), spec)?;
                let params = self.uniform(&[
                    c.rows as u32,
                    nv as u32,
                    n as u32,
                    flags.0,
                    rps as u32,
                    gx,
                    part0 as u32,
                    offset.to_bits(),
                ]);
                let (off, bytes) = (c.row0 as u64 * row_bytes, c.rows as u64 * row_bytes);
                let (soff, sbytes) = (c.row0 as u64 * 4, c.rows as u64 * 4);
                let mut entries = self.saved_entries(spec, a, &params, c, row_bytes);
                entries.extend([
                    entry(7, opt_bind(a.dh, &self.dummy, off, bytes)),
                    entry(8, bind(&a.dx.buffer, off, bytes)),
                    entry(9, bind(&lo, soff, sbytes)),
                    entry(10, part_g.as_entire_binding()),
                    entry(11, part_b.as_entire_binding()),
                ]);
                let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("layernorm backward"),
                    layout: &layout,
                    entries: &entries,
                });
                pass.set_bind_group(0, &bg, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
                part0 += segs_c;
            }
        }

        if want_params {
            let (part_g, part_b, parts) = if fused {
                (part_g, part_b, parts)
            } else {
                self.param_pass(spec, a, &chunks, &lo, &mut enc)?
            };
            self.param_finish(spec, a, &part_g, &part_b, parts, &mut enc)?;
        }
        self.queue.submit([enc.finish()]);
        Ok(())
    }

    fn partials_too_large(&self, spec: &NormSpec) -> Error {
        Error::TooLarge {
            rows: spec.rows,
            n: spec.n,
            limit: format!(
                "the device's max_storage_buffer_binding_size ({} bytes) for the dγ/dβ partial \
                 sums",
                self.max_binding
            ),
        }
    }

    /// dγ/dβ stage 1 as its own pass (`shaders/params_grad.wgsl`), for rows too long to keep in
    /// registers: one partial per block of rows and column. Returns the partial buffers and count.
    fn param_pass(
        &self,
        spec: &NormSpec,
        a: &Backward<'_, WgpuBuffer>,
        chunks: &[Chunk],
        lo: &wgpu::Buffer,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<(wgpu::Buffer, wgpu::Buffer, usize)> {
        let (rows, n) = (spec.rows, spec.n);
        let flags = Self::backward_flags(spec, a);
        let offset = spec.gamma_offset_acc() as f32;
        let es = spec.dtype.size() as u64;
        let row_bytes = n as u64 * es;
        // Rows per block: at least 32, and at most about 2^20 partials per tensor in all; more
        // rows per block while the partials would not fit in one binding.
        let max_parts = (self.max_binding / 4 / n as u64) as usize;
        let target_blocks = ((1usize << 20) / n).min(max_parts).clamp(1, 1024);
        let mut block = rows.div_ceil(target_blocks).max(32);
        let count = |block: usize| chunks.iter().map(|c| c.rows.div_ceil(block)).sum::<usize>();
        while count(block) > max_parts.min(self.max_groups as usize) && block < rows {
            block *= 2;
        }
        let parts: Vec<usize> = chunks.iter().map(|c| c.rows.div_ceil(block)).collect();
        let total: usize = parts.iter().sum();
        if total > max_parts || total > self.max_groups as usize {
            return Err(self.partials_too_large(spec));
        }
        let part_bytes = total as u64 * n as u64 * 4;
        let part_g = self.scratch(spec, part_bytes)?;
        let part_b = self.scratch(spec, part_bytes)?;
        let io = Io::scalar(spec.dtype);
        let col_groups = n.div_ceil(CW as usize).clamp(1, self.max_groups as usize) as u32;
        let grad = self.pipeline(Kernel::ParamsGrad, io, None)?;
        let layout = grad.get_bind_group_layout(0);
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&grad);
        let mut part0 = 0usize;
        for (c, &p) in chunks.iter().zip(&parts) {
            let params = self.uniform(&[
                c.rows as u32,
                n as u32,
                block as u32,
                part0 as u32,
                flags.0,
                offset.to_bits(),
                col_groups,
                0,
            ]);
            let (soff, sbytes) = (c.row0 as u64 * 4, c.rows as u64 * 4);
            let mut entries = self.saved_entries(spec, a, &params, c, row_bytes);
            entries.extend([
                entry(7, bind(lo, soff, sbytes)),
                entry(8, part_g.as_entire_binding()),
                entry(9, part_b.as_entire_binding()),
            ]);
            let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("layernorm dgamma/dbeta partials"),
                layout: &layout,
                entries: &entries,
            });
            pass.set_bind_group(0, &bg, &[]);
            pass.dispatch_workgroups(col_groups, p as u32, 1);
            part0 += p;
        }
        drop(pass);
        Ok((part_g, part_b, total))
    }

    /// dγ/dβ stage 2 (`shaders/params_finish.wgsl`): each column's `parts` partials added in a
    /// fixed order and stored in the storage dtype.
    fn param_finish(
        &self,
        spec: &NormSpec,
        a: &Backward<'_, WgpuBuffer>,
        part_g: &wgpu::Buffer,
        part_b: &wgpu::Buffer,
        parts: usize,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        let n = spec.n;
        let row_bytes = n as u64 * spec.dtype.size() as u64;
        let io = Io::scalar(spec.dtype);
        let col_groups = n.div_ceil(CW as usize).clamp(1, self.max_groups as usize) as u32;
        let flags = Flags::default()
            .with(Flags::DGAMMA, a.dgamma.is_some())
            .with(Flags::DBETA, a.dbeta.is_some());
        let finish = self.pipeline(Kernel::ParamsFinish, io, None)?;
        let params = self.uniform(&[n as u32, parts as u32, flags.0, col_groups]);
        let dgamma = a.dgamma.as_deref().map_or(&self.dummy, |b| &b.buffer);
        let dbeta = a.dbeta.as_deref().map_or(&self.dummy, |b| &b.buffer);
        let bg = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("layernorm dgamma/dbeta"),
            layout: &finish.get_bind_group_layout(0),
            entries: &[
                entry(0, params.as_entire_binding()),
                entry(1, part_g.as_entire_binding()),
                entry(2, part_b.as_entire_binding()),
                entry(3, bind(dgamma, 0, row_bytes)),
                entry(4, bind(dbeta, 0, row_bytes)),
            ],
        });
        let mut pass = enc.begin_compute_pass(&Default::default());
        pass.set_pipeline(&finish);
        pass.set_bind_group(0, &bg, &[]);
        pass.dispatch_workgroups(col_groups, 1, 1);
        Ok(())
    }
}
