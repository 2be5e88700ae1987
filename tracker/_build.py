from cffi import FFI
ffi = FFI()
ffi.cdef("int x(void);")
ffi.set_source("tracker._shards", "int x(void){return 1;}")
