// Every genfast schema, defined once. Implementations live in cpu/ and cuda/, one op per file.
#include <torch/library.h>

TORCH_LIBRARY(genfast, m) {
  // One pass of a diffusion sampler; see kernels/common/denoise_step.h for the formula.
  // coefs holds the per-call coefficients; row_coefs, when given, one row of them per sample.
  // In-kernel noise is keyed by (seed, offset), or on CUDA by `generator`, a CUDA generator whose
  // offset the op advances by 4 (graph-safe under CUDA graph capture).
  m.def(
      "denoise_step(Tensor sample, Tensor model_output, Tensor? model_output_cond, Tensor? derivative, "
      "Tensor? noise, Tensor? row_coefs, float[] coefs, bool clip, float clip_lo, float clip_hi, "
      "bool philox_noise, Generator? generator, int seed, int offset, Tensor(a!) out, Tensor(b!)? pred_original) -> ()");
  // A Langevin-type update (kernels/common/langevin_step.h); coefs: x_scale, step_size, noise_std,
  // grad_scale. grad_clip = inf and clamp_lo/hi = -inf/inf disable clipping and clamping.
  m.def(
      "langevin_step(Tensor x, Tensor grad, Tensor? noise, Tensor? row_coefs, float[] coefs, float grad_clip, "
      "float clamp_lo, float clamp_hi, bool philox_noise, Generator? generator, int seed, int offset, "
      "Tensor(a!) out, Tensor(b!)? mean_out) -> ()");
  // score_sde's Langevin corrector: step sizes 2 alpha (snr ||z|| / ||score||)^2 per sample (norms
  // as batch means, or per sample), then a Langevin step with the same noise z.
  m.def(
      "langevin_corrector_step(Tensor x, Tensor score, Tensor? noise, Tensor alpha, float snr, "
      "bool per_sample_norms, bool philox_noise, Generator? generator, int seed, int offset, Tensor(a!) out, "
      "Tensor(b!)? mean_out) -> ()");
  // MALA's accept/reject of a Langevin proposal y (kernels/common/mala.h): keeps y, grad_y and
  // energy_y where log(uniform) < the log acceptance ratio, else x, grad_x and energy_x.
  m.def(
      "mala_accept(Tensor x, Tensor y, Tensor grad_x, Tensor grad_y, Tensor energy_x, Tensor energy_y, "
      "Tensor step_size, Tensor uniform, Tensor(a!) x_out, Tensor(b!) grad_out, Tensor(c!) energy_out, "
      "Tensor(d!) accepted) -> ()");
  // Normalizing flows (kernels/common/affine_coupling.h, actnorm.h, lu_weight.h). Each returns its
  // output and float32 log-determinants; the *_backward ops are the fused gradient kernels.
  // affine_coupling: index (int32, one per element of a sample) is -1 for identity elements, else
  // the position of their shift and scale; scale_fn is one of exp, sigmoid, softplus, tanh, atan,
  // soft_bound, with its one parameter.
  m.def(
      "affine_coupling(Tensor x, Tensor shift, Tensor scale, Tensor index, str scale_fn, float scale_param, "
      "bool glow_order, bool inverse) -> (Tensor, Tensor)");
  m.def(
      "affine_coupling_backward(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor shift, Tensor scale, "
      "Tensor index, str scale_fn, float scale_param, bool glow_order, bool inverse) -> (Tensor, Tensor, Tensor)");
  m.def("actnorm(Tensor x, Tensor log_scale, Tensor bias, bool glow_order, bool inverse) -> (Tensor, Tensor)");
  m.def(
      "actnorm_backward(Tensor grad_y, Tensor grad_logdet, Tensor x, Tensor log_scale, Tensor bias, "
      "bool glow_order, bool inverse) -> (Tensor, Tensor, Tensor)");
  // The weight W = P L U of an invertible 1x1 convolution and log|det W|.
  m.def("lu_weight(Tensor lower, Tensor upper, Tensor log_diag, Tensor sign, Tensor perm) -> (Tensor, Tensor)");
  m.def(
      "lu_weight_backward(Tensor grad_weight, Tensor grad_logabsdet, Tensor lower, Tensor upper, Tensor log_diag, "
      "Tensor sign, Tensor perm) -> (Tensor, Tensor, Tensor)");
  // Binary NADE's logits of p(x_d = 1 | x_<d) (kernels/common/nade.h), with O(B H) working memory;
  // ordering: none, one (D,) for all samples, or one per sample (B, D); activation sigmoid or relu.
  m.def(
      "nade_conditionals(Tensor x, Tensor W, Tensor c, Tensor V, Tensor b, Tensor? ordering, str activation) "
      "-> Tensor");
  // Its fused backward: gradients to W, c, V, b and x from those of the logits, recomputing the
  // running pre-activations instead of storing them.
  m.def(
      "nade_conditionals_backward(Tensor grad_logits, Tensor x, Tensor W, Tensor c, Tensor V, Tensor b, "
      "Tensor? ordering, str activation) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // num_samples samples of a binary NADE in one launch: uniforms (num_samples, D) when given, else
  // in-kernel Philox uniforms keyed by (seed, offset), or on CUDA by `generator`. The first
  // num_observed dimensions of the ordering are copied from `observed` (conditional completion).
  m.def(
      "nade_sample(Tensor W, Tensor c, Tensor V, Tensor b, int num_samples, ScalarType dtype, Tensor? uniforms, "
      "Tensor? ordering, Tensor? observed, int num_observed, str activation, Generator? generator, int seed, "
      "int offset) -> Tensor");
  // MADE's masked linear layer (kernels/common/made_linear.h): y = x (W * M)^T + bias with the mask
  // M[k, j] = out_degrees[k] >= in_degrees[j] (> when strict) computed in-kernel, never stored.
  m.def(
      "made_linear(Tensor x, Tensor weight, Tensor? bias, Tensor in_degrees, Tensor out_degrees, bool strict) "
      "-> Tensor");
  // Its backward: (grad_x, grad_weight, grad_bias), grad_bias the column sums of grad_y.
  m.def(
      "made_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor in_degrees, Tensor out_degrees, "
      "bool strict) -> (Tensor, Tensor, Tensor)");
  // Scaled-dot-product attention (kernels/common/attention.h), forward: (o, lse float32). q, k, v
  // (batch, heads, length, dim), k and v with heads dividing q's; attn_mask bool or additive,
  // broadcastable to (batch, heads, Lq, Lk); alibi_slopes (heads) or (batch, heads); softcap 0 for
  // none; keys j with i + band_lo <= j <= i + band_hi are seen (+-2^62: unbounded); dropout keyed by
  // (seed, offset), which the backward replays. deterministic is the backward's, carried by autograd
  // (the forward does not read it). float_o: o in float32 for float16 and bfloat16 inputs, unrounded
  // (genfast.attention asks for it when an additive mask needs its gradient, whose backward takes
  // delta from it, and rounds it for the caller: the o it would have given). sinks: (heads) logits
  // that join each row's softmax without a value (attention sinks); lse includes them. qv (batch, heads,
  // Lq, v_dim), q's dtype: the scores are scale (q k^T + qv v^T), as attention_varlen_forward's;
  // forward only, the CUDA kernels refuse it.
  m.def(
      "attention_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, Tensor? alibi_slopes, float scale, "
      "float softcap, int band_lo, int band_hi, float dropout_p, int seed, int offset, bool deterministic=False, "
      "bool float_o=False, Tensor? sinks=None, Tensor? qv=None) -> (Tensor, Tensor)");
  // Its backward from the forward's o and lse: (grad_q, grad_k, grad_v, and with grad_mask the
  // gradient of the scores (batch, heads, Lq, Lk) summed over the batch, heads, queries and keys that
  // attn_mask broadcasts over (1 there), in an additive attn_mask's dtype, else float32: an additive
  // mask's gradient, up to a reshape).
  // deterministic=False lets the CUDA kernels add dQ with atomics (bits may vary from run to run).
  // With the forward's sinks, the sinks' gradient last (in their dtype), from the rows' delta =
  // grad_o . o - grad_lse that the backward computes anyway; a backward that recomputes o in float32
  // for a mask's gradient also takes the sinks for that.
  m.def(
      "attention_backward(Tensor grad_o, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, "
      "Tensor? attn_mask, Tensor? alibi_slopes, float scale, float softcap, int band_lo, int band_hi, "
      "float dropout_p, int seed, int offset, bool grad_mask, bool deterministic=False, Tensor? sinks=None) "
      "-> (Tensor, Tensor, Tensor, Tensor?, Tensor?)");
  // Packed variable-length batches: q (total_q, heads, dim), k and v (total_k, kv_heads, dim), sequence
  // b at rows cu_seqlens[b] .. cu_seqlens[b + 1] (int32, batch + 1); max_seqlen_q and max_seqlen_k
  // bound the sequences' lengths (with seqused_k, max_seqlen_k bounds the keys used, not the rows).
  // The band is relative to each sequence's bottom-right diagonal.
  // (o (total_q, heads, v_dim), lse (heads, total_q) float32). seqused_k (int32 (batch,)): sequence b
  // has only the first seqused_k[b] keys of its rows (a padded KV cache). block_table (int32 (batch,
  // pages per sequence)): k and v are a paged cache (pages, page_size, kv_heads, dim), forward only.
  // qv (total_q, heads, v_dim), q's dtype: the scores are scale (q k^T + qv v^T) (multi-head latent
  // attention's absorbed form), forward only; the CPU kernels take it, the CUDA kernels refuse it.
  m.def(
      "attention_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, Tensor? alibi_slopes, float scale, float softcap, int band_lo, "
      "int band_hi, float dropout_p, int seed, int offset, bool deterministic=False, Tensor? sinks=None, "
      "Tensor? seqused_k=None, Tensor? block_table=None, Tensor? qv=None) -> (Tensor, Tensor)");
  m.def(
      "attention_varlen_backward(Tensor grad_o, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor o, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "Tensor? alibi_slopes, float scale, float softcap, int band_lo, int band_hi, float dropout_p, int seed, "
      "int offset, bool deterministic=False, Tensor? sinks=None, Tensor? seqused_k=None) "
      "-> (Tensor, Tensor, Tensor, Tensor?)");
  // A KV cache's new rows (kernels/common/kvcache_append.h): k and v (batch, seqlen_new, kv_heads,
  // dim) written at rows cache_seqlens[b] + i of the padded (cache_batch_idx) or paged (block_table)
  // caches, k turned first by the rotary tables (positions, rotary_dim / 2) when given; q turned
  // into q_out at cache_seqlens[b] + i (queries_in_sequence) or cache_seqlens[b].
  m.def(
      "kvcache_append(Tensor k, Tensor v, Tensor cache_seqlens, Tensor? cache_batch_idx, Tensor? block_table, "
      "Tensor? rotary_cos, Tensor? rotary_sin, bool rotary_interleaved, Tensor? q, bool queries_in_sequence, "
      "Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor(c!)? q_out) -> ()");
  // Rotary position embedding (kernels/common/rotary.h): x (batch, seqlen, heads, head_dim), token
  // (b, i) turned by row positions[b, i] (int32, any strides) of cos and sin (positions, rotary_dim /
  // 2); inverse turns back (the backward). rotary returns a tensor of x's layout, rotary_ turns x.
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool inverse) -> Tensor");
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool inverse) -> ()");
  // Partial attentions merged (kernels/common/attention_merge.h): the states' o (rows_outer,
  // rows_inner, head_dim) and float32 lse (rows_outer, rows_inner) give the attention over all their
  // keys, (rows_outer, rows_inner, head_dim) in o's dtype and its lse. States of one layout (o's
  // features contiguous) are read where they lie (up to eight anywhere, more evenly spaced); others
  // are copied first. lse is to base e^ln_base (1: natural, ln 2: base 2). attention_merge_out writes
  // into out (features contiguous) and out_lse, any other strides, each one of the states (a merge
  // in place) or apart from them. The backward returns the gradients of the states' o and lse
  // stacked, contiguous.
  m.def("attention_merge(Tensor[] o, Tensor[] lse, float ln_base=1.0) -> (Tensor, Tensor)");
  m.def("attention_merge_out(Tensor[] o, Tensor[] lse, float ln_base, Tensor(a!) out, Tensor(b!) out_lse) -> ()");
  m.def(
      "attention_merge_backward(Tensor grad_out, Tensor? grad_lse, Tensor[] o, Tensor[] lse, float ln_base=1.0) -> "
      "(Tensor, Tensor)");
}
