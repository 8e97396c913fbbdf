# qublk build.  `make` builds build/qublk; `make asan` builds build-asan/qublk
# with AddressSanitizer/UBSan; `make check` runs the test suite against both;
# `make bench` runs the benchmarks (not part of check).
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
LDLIBS += -luring -lz -lzstd -lpthread

LIB_SRC := $(wildcard src/common/*.c src/block/*.c src/qcow2/*.c src/nbd/*.c src/ublk/*.c)
CLI_SRC := $(wildcard src/cli/*.c)
UNIT_SRC := $(wildcard tests/unit/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(O)/%.o)
CLI_OBJ := $(CLI_SRC:%.c=$(O)/%.o)
UNIT_BIN := $(UNIT_SRC:tests/unit/%.c=$(O)/tests/%)

# Test tools that are not unit tests (tests/run.sh runs every $(O)/tests/*).
TOOL_BIN := $(O)/ublk-race

all: $(O)/qublk $(UNIT_BIN) $(TOOL_BIN)

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

# ublk-race runs inside the test VM against a ublk device (tests/vm/guest/ublk-race.sh).
$(O)/ublk-race: $(O)/tests/vm/tools/ublk-race.o
	$(CC) $(LDFLAGS) -o $@ $< -luring -lpthread

asan:
	$(MAKE) O=build-asan SAN=1 all

check: all asan
	tests/run.sh

bench: all
	bench/run.sh

clean:
	rm -rf build build-asan

.PHONY: all asan check bench clean
-include $(shell find $(O) -name '*.d' 2>/dev/null)
