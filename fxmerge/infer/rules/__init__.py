"""Built-in permutation rules, one module per op family. Importing this package registers them."""

from fxmerge.infer.rules import (  # noqa: F401  (imported for registration)
    attention,
    constants,
    elementwise,
    linear_conv,
    norm,
    pooling,
    reduce,
    shape,
    slicing,
    thirdparty,
)
