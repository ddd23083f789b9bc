"""The compiler's core: the IR, the plan, the format registry, the float reference executor, the size model
(layout), errors, files and caches. Light to import: the on-device runtime uses errors and fs from here."""
