"""Differential privacy: private training (DP-SGD; Abadi et al. 2016, through jax-privacy)
and a memorization audit with canaries.

What makes a step private:
- the batch is a Poisson sample: every training example (one packed row of
  data.seq_len tokens) joins each step independently with probability
  q = expected_batch / N (jax_privacy.batch_selection.CyclicPoissonSampling), and
  the compiled batch of data.global_batch_size rows is padded with empty rows; in
  a step that samples more, a uniform subset is kept (truncation), which the
  accountant charges (by default the expected batch leaves that at most 1e-6 a step);
- every example's gradient (of its own mean token loss) is clipped to L2 norm
  privacy.clip_norm (jax_privacy.clipping.clipped_grad), the clipped gradients are
  summed, Gaussian noise of standard deviation noise_multiplier x clip_norm is added
  to the sum, and the result is divided by the expected batch size;
- epsilon at privacy.delta is computed by the PLD accountant (dp_accounting, built
  as jax_privacy's DP-SGD analysis builds it: the truncated Poisson-subsampled
  Gaussian), composed over every step taken at the noise and sampling it was taken
  with: a ledger of segments kept in the checkpoint, so a resumed run (with more
  steps, another target or batch) charges the steps before it as they were, never
  less; logged with the training metrics and written to metrics.jsonl.
The unit of privacy is one training row: a document longer than a row is several
examples, and a string repeated k times enjoys k-fold group privacy at most.

Modules: gradients (the clipped, noised gradient), sampling (Poisson batches),
accounting (the ledger and epsilon), run (a private run as the loop sees it),
audit (canaries: exposure, Carlini et al. 2019).
"""
