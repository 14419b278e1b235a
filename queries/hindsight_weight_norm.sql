-- The norm of the first layer's weights at the end of every epoch, next to the logged val_acc.
-- An epoch-level value: wherever an end-of-inner-loop checkpoint exists the steps are skipped.
SELECT epoch, val_acc, w_norm
FROM run_1
ORDER BY epoch
