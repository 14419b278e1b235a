-- Replayed and logged values in the same rows: the last epoch's steps, with the logged loss.
SELECT step, loss, grad_norm, grad_norm / loss AS grad_over_loss
FROM run_1
WHERE epoch = 7
ORDER BY step
