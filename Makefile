# qublk build.  `make` builds build/qublk; `make asan` builds build-asan/qublk
# with AddressSanitizer/UBSan; `make check` runs the test suite against both;
# `make bench` runs the benchmarks and `make soak` the crash-state simulator
# over 100,000 power cuts (neither is part of check).
CC ?= gcc
O ?= build
CFLAGS_BASE := -std=gnu11 -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
	-D_GNU_SOURCE -Isrc -g -MMD -MP
ifeq ($(SAN),1)
CFLAGS_OPT := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined -DQUBLK_ASAN=1
LDFLAGS_SAN := -fsanitize=address,undefined
else
CFLAGS_OPT := -O2
LDFLAGS_SAN :=
endif
CFLAGS += $(CFLAGS_BASE) $(CFLAGS_OPT)
LDFLAGS += $(LDFLAGS_SAN) -Wl,-z,defs
GNUTLS_CFLAGS := $(shell pkg-config --cflags gnutls)
GNUTLS_LIBS := $(shell pkg-config --libs gnutls)
CFLAGS += $(GNUTLS_CFLAGS)
LDLIBS += -luring -lz -lzstd -lpthread $(GNUTLS_LIBS)

LIB_SRC := $(wildcard src/common/*.c src/block/*.c src/qcow2/*.c src/nbd/*.c src/ublk/*.c)
CLI_SRC := $(wildcard src/cli/*.c)
UNIT_SRC := $(wildcard tests/unit/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(O)/%.o)
CLI_OBJ := $(CLI_SRC:%.c=$(O)/%.o)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(O)/tests/%)

all: $(O)/qublk $(UNIT_BIN)

$(O)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(O)/%.o: %.S
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(O)/libqublk.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(O)/qublk: $(CLI_OBJ) $(O)/libqublk.a
	$(CC) $(LDFLAGS) -o $@ $(CLI_OBJ) $(O)/libqublk.a $(LDLIBS)

$(O)/tests/%: $(O)/tests/unit/%.o $(O)/libqublk.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $< $(O)/libqublk.a $(LDLIBS)

asan:
	$(MAKE) O=build-asan SAN=1 all

check: all asan
	tests/run.sh

bench: all
	bench/run.sh

SOAK_STATES ?= 100000
soak: $(O)/tests/test_powercut
	$(O)/tests/test_powercut $(SOAK_STATES)

clean:
	rm -rf build build-asan

.PHONY: all asan check bench soak clean
-include $(shell find $(O) -name '*.d' 2>/dev/null)
