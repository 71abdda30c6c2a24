"""x86_64: memory layout, register/GDT/page-table setup, CPUID and MSR policy."""
