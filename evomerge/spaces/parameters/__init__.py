"""The parameter space kind: merge coefficients of one method, per group of layers."""
