-- Back to migration 13: every replica folds on its own timer.
DROP FUNCTION keygate_fold_claim(interval);
DROP TABLE keygate_fold_clock;
