from cffi import FFI
ffi = FFI()
ffi.cdef("int x(void);")
ffi.set_source("reporter._btree", "int x(void){return 1;}")
