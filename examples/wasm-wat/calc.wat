;; A wasm plugin written by hand in the WebAssembly text format.
;;
;; Numeric exports are methods called with numbers: call("add", 2, 3) -> 5.
;; "describe" uses sandboxer's JSON ABI: the host writes the call's args (a JSON array) into a
;; buffer from sandboxer_alloc and calls describe(ptr, len); the reply is packed as
;; ptr << 32 | len of {"result": ...} in this module's memory.
(module
  (import "sandboxer" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))

  ;; A bump allocator: enough for a plugin whose arguments are small; the host reuses the
  ;; buffer it gets, so this is called again only when a call's arguments are bigger.
  (func (export "sandboxer_alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i32)
    (local.set $ptr (global.get $heap))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (if (i32.gt_u (local.get $end) (i32.mul (memory.size) (i32.const 65536)))
      (then
        (if (i32.eq
              (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end)
                                                        (i32.mul (memory.size) (i32.const 65536)))
                                               (i32.const 16))
                                    (i32.const 1)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $ptr))

  (func (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1)))

  (func (export "fib") (param $n i64) (result i64)
    (local $a i64) (local $b i64) (local $t i64)
    (local.set $b (i64.const 1))
    (block $done
      (loop $next
        (br_if $done (i64.eqz (local.get $n)))
        (local.set $t (i64.add (local.get $a) (local.get $b)))
        (local.set $a (local.get $b))
        (local.set $b (local.get $t))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $next)))
    (local.get $a))

  ;; describe(args...) -> {"result": {"args": [...]}}: wraps the arguments it was given.
  (data (i32.const 0) "{\"result\":{\"args\":")
  (func (export "describe") (param $ptr i32) (param $len i32) (result i64)
    (call $log (i32.const 1) (i32.const 64) (i32.const 23))
    ;; reply at 1024: the 18-byte prefix, the args, then "}}"
    (memory.copy (i32.const 1024) (i32.const 0) (i32.const 18))
    (memory.copy (i32.const 1042) (local.get $ptr) (local.get $len))
    (i32.store16 (i32.add (i32.const 1042) (local.get $len)) (i32.const 0x7d7d))
    (i64.or (i64.shl (i64.const 1024) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 20)))))
  (data (i32.const 64) "describe: called by wat"))
